//! What a server may do to a data directory at start and at shutdown: a second server on the
//! same data directory (with another state directory) is refused before its start-up recovery
//! touches anything; a server whose state store is empty keeps snapshot storage it has no
//! record of instead of deleting it as an interrupted snapshot; a server that drains at
//! shutdown never removes a socket a newer server has put at its path; a mount timeout
//! that would make every call time out at once is refused; so is a log level that names no
//! level; and a debugging TCP endpoint on port 0 logs the port it got.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Driver, create_request};
use k8scsi::csi::proto;

const MIB: i64 = 1 << 20;

/// A dir volume with a file in it and a ready snapshot of it: the snapshot's storage directory.
async fn volume_with_snapshot(driver: &Driver) -> std::path::PathBuf {
    let mut controller = driver.controller().await;
    let volume = common::create_ok(&mut controller, create_request("v", MIB))
        .await
        .volume_id;
    std::fs::write(
        driver.data_dir().join("volumes").join(&volume).join("f"),
        b"data",
    )
    .unwrap();
    let snapshot = controller
        .create_snapshot(proto::CreateSnapshotRequest {
            source_volume_id: volume,
            name: "s".to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listed = controller
            .list_snapshots(proto::ListSnapshotsRequest {
                snapshot_id: snapshot.snapshot_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let ready = listed
            .entries
            .iter()
            .any(|e| e.snapshot.as_ref().is_some_and(|s| s.ready_to_use));
        if ready {
            break;
        }
        assert!(Instant::now() < deadline, "snapshot never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let storage = driver
        .data_dir()
        .join("snapshots")
        .join(&snapshot.snapshot_id);
    assert!(storage.exists(), "{} missing", storage.display());
    storage
}

/// Starts `k8scsi serve` on `driver`'s data and kubelet directories with `state_dir` and
/// `socket`, logging to `<test dir>/second.log`.
fn spawn_beside(
    driver: &Driver,
    state_dir: &Path,
    socket: &Path,
    extra: &[&str],
) -> std::process::Child {
    std::process::Command::new(common::BINARY)
        .arg("serve")
        .arg("--endpoint")
        .arg(format!("unix://{}", socket.display()))
        .args(["--node-id", "node-2", "--state-dir"])
        .arg(state_dir)
        .arg("--data-dir")
        .arg(driver.data_dir())
        .arg("--kubelet-dir")
        .arg(driver.kubelet_dir())
        .args(extra)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(second_log(driver)).unwrap())
        .spawn()
        .unwrap()
}

fn second_log(driver: &Driver) -> std::path::PathBuf {
    driver.dir.path().join("second.log")
}

/// [`spawn_beside`], then its exit status and log once it exits (or kills it after 20 s).
fn serve_beside(
    driver: &Driver,
    state_dir: &Path,
    socket: &Path,
    extra: &[&str],
) -> (Option<std::process::ExitStatus>, String) {
    let mut child = spawn_beside(driver, state_dir, socket, extra);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (
        status,
        std::fs::read_to_string(second_log(driver)).unwrap_or_default(),
    )
}

#[tokio::test]
async fn a_second_server_on_the_same_data_directory_is_refused_before_it_touches_it() {
    let driver = Driver::start();
    let storage = volume_with_snapshot(&driver).await;
    let other_state = driver.dir.path().join("other-state");
    let (status, log) = serve_beside(
        &driver,
        &other_state,
        &driver.dir.path().join("other.sock"),
        &[],
    );
    assert!(
        status.is_some_and(|s| !s.success()),
        "the second server started: {log}"
    );
    assert!(
        log.contains("another k8scsi server is using the data directory"),
        "{log}"
    );
    assert!(
        storage.join("f").exists(),
        "the live server's snapshot was removed: {log}"
    );
}

#[tokio::test]
async fn a_server_with_an_empty_state_store_keeps_snapshots_it_has_no_record_of() {
    let mut driver = Driver::start();
    let storage = volume_with_snapshot(&driver).await;
    driver.stop();
    // The same data directory with a lost (empty) state directory, e.g. one on tmpfs after a
    // reboot, or a mistyped --state-dir.
    let empty_state = driver.dir.path().join("empty-state");
    let socket = driver.dir.path().join("other.sock");
    let log = second_log(&driver);
    let mut child = spawn_beside(&driver, &empty_state, &socket, &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "{}",
            std::fs::read_to_string(&log).unwrap()
        );
        assert!(Instant::now() < deadline, "the server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        storage.join("f").exists(),
        "snapshot storage was deleted: {}",
        std::fs::read_to_string(&log).unwrap()
    );
}

#[tokio::test]
async fn a_draining_server_leaves_a_newer_servers_socket_alone() {
    let mut driver = Driver::start();
    // A newer server (a restarted DaemonSet pod) took the socket path while this one still
    // runs or drains: a socket of the test's own at the path stands in for it. (The running
    // server keeps serving on its unlinked socket.)
    std::fs::remove_file(driver.socket()).unwrap();
    let listener = std::os::unix::net::UnixListener::bind(driver.socket()).unwrap();
    driver.stop();
    assert!(
        driver.socket().exists(),
        "the stopping server removed the newer server's socket"
    );
    drop(listener);
}

#[tokio::test]
async fn a_mount_timeout_of_zero_is_refused() {
    let driver = Driver::start();
    let (status, log) = serve_beside(
        &driver,
        &driver.dir.path().join("other-state"),
        &driver.dir.path().join("other.sock"),
        &["--share-timeout", "0s"],
    );
    assert!(status.is_some_and(|s| !s.success()), "{log}");
    assert!(log.contains("--share-timeout"), "{log}");
}

/// A log level that names no level (a typo) is refused at start, naming the flag, instead of
/// being read as a target filter that silently turns the driver's logging off.
#[tokio::test]
async fn a_log_level_that_names_no_level_is_refused() {
    let driver = Driver::start();
    for level in ["inof", "k8scsi=verbose", ""] {
        let (status, log) = serve_beside(
            &driver,
            &driver.dir.path().join("other-state"),
            &driver.dir.path().join("other.sock"),
            &["--log-level", level],
        );
        assert!(status.is_some_and(|s| !s.success()), "{level:?}: {log}");
        assert!(log.contains("--log-level"), "{level:?}: {log}");
        assert!(
            !driver.dir.path().join("other-state").exists(),
            "{level:?}: started before refusing"
        );
    }
}

/// `tcp://host:0` (for debugging) lets the kernel pick the port; the start-up log names the
/// port the server got, not `:0`, and the server answers there.
#[tokio::test]
async fn a_tcp_endpoint_on_port_zero_logs_the_port_it_got() {
    let driver = Driver::start();
    let log_path = driver.dir.path().join("tcp.log");
    let mut child = std::process::Command::new(common::BINARY)
        .args(["serve", "--endpoint", "tcp://127.0.0.1:0", "--node-id", "n"])
        .arg("--state-dir")
        .arg(driver.dir.path().join("tcp-state"))
        .arg("--data-dir")
        .arg(driver.dir.path().join("tcp-data"))
        .arg("--kubelet-dir")
        .arg(driver.kubelet_dir())
        .args(["--log-format", "json"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let endpoint = loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let serving = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|l| l["message"] == "k8scsi serving");
        if let Some(line) = serving {
            break line["endpoint"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "never served: {log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let port: u16 = endpoint
        .strip_prefix("tcp://127.0.0.1:")
        .unwrap_or_else(|| panic!("{endpoint}"))
        .parse()
        .unwrap();
    assert_ne!(port, 0, "{endpoint}");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let info = proto::identity_client::IdentityClient::new(channel)
        .get_plugin_info(proto::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "k8scsi");
    let _ = child.kill();
    let _ = child.wait();
}
