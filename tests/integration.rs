//! End-to-end tests of k8scsi: the real `k8scsi serve` binary on temporary directories, driven
//! over its real unix socket with the generated CSI clients. Node tests make real bind mounts and
//! need root (they print a skip reason otherwise; CI runs them as root).
//!
//! Every test starts its own server, so tests are independent and run in parallel.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use k8scsi::client::mount_capability;
use k8scsi::csi::proto::controller_client::ControllerClient;
use k8scsi::csi::proto::controller_service_capability::rpc::Type as CtrlCap;
use k8scsi::csi::proto::node_service_capability::rpc::Type as NodeCap;
use k8scsi::csi::proto::plugin_capability::service::Type as PluginCap;
use k8scsi::csi::proto::volume_capability::access_mode::Mode;
use k8scsi::csi::proto::volume_capability::{AccessMode, AccessType, BlockVolume};
use k8scsi::csi::proto::volume_usage::Unit;
use k8scsi::csi::proto::{self, VolumeCapability};
use prost::Message;
use prost::bytes::{Buf, BufMut};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

const MIB: i64 = 1024 * 1024;
const TOPOLOGY_KEY: &str = "topology.k8scsi.io/node";
/// A well-formed volume ID that no volume has.
const UNKNOWN_ID: &str = "dir-00000000000000000000000000000000";
const EROFS: i32 = 30;
const EACCES: i32 = 13;
const ETXTBSY: i32 = 26;

// ----- helpers -----

/// Asserts that a call failed with `want` and returns the status for message checks.
#[track_caller]
fn expect_code<T: std::fmt::Debug>(result: Result<Response<T>, Status>, want: Code) -> Status {
    match result {
        Ok(response) => panic!("expected {want:?}, got OK: {:?}", response.into_inner()),
        Err(status) => {
            assert_eq!(status.code(), want, "unexpected status: {status:?}");
            status
        }
    }
}

/// Asserts that a status message mentions `needle`.
#[track_caller]
fn assert_mentions(status: &Status, needle: &str) {
    assert!(
        status.message().contains(needle),
        "status message {:?} does not mention {needle:?}",
        status.message()
    );
}

fn capability(mode: Mode, flags: &[&str]) -> VolumeCapability {
    mount_capability(mode, flags.iter().map(|f| f.to_string()).collect())
}

fn block_capability() -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

fn segment(key: &str, node: &str) -> proto::Topology {
    proto::Topology {
        segments: HashMap::from([(key.to_string(), node.to_string())]),
    }
}

async fn create(
    controller: &mut ControllerClient<Channel>,
    name: &str,
    bytes: i64,
) -> proto::Volume {
    common::create_ok(controller, create_request(name, bytes)).await
}

async fn delete(controller: &mut ControllerClient<Channel>, id: &str) -> Result<(), Status> {
    controller
        .delete_volume(proto::DeleteVolumeRequest {
            volume_id: id.to_string(),
            secrets: Default::default(),
        })
        .await
        .map(|_| ())
}

async fn get_volume(
    controller: &mut ControllerClient<Channel>,
    id: &str,
) -> Result<Response<proto::ControllerGetVolumeResponse>, Status> {
    controller
        .controller_get_volume(proto::ControllerGetVolumeRequest {
            volume_id: id.to_string(),
        })
        .await
}

async fn list(
    controller: &mut ControllerClient<Channel>,
    max_entries: i32,
    token: &str,
) -> Result<Response<proto::ListVolumesResponse>, Status> {
    controller
        .list_volumes(proto::ListVolumesRequest {
            max_entries,
            starting_token: token.to_string(),
        })
        .await
}

/// Every volume ID ListVolumes reports, following tokens.
async fn list_all_ids(controller: &mut ControllerClient<Channel>) -> Vec<String> {
    let mut ids = Vec::new();
    let mut token = String::new();
    loop {
        let page = list(controller, 7, &token).await.unwrap().into_inner();
        ids.extend(
            page.entries
                .iter()
                .map(|e| e.volume.as_ref().unwrap().volume_id.clone()),
        );
        if page.next_token.is_empty() {
            return ids;
        }
        token = page.next_token;
    }
}

async fn publish(
    driver: &Driver,
    request: proto::NodePublishVolumeRequest,
) -> Result<Response<proto::NodePublishVolumeResponse>, Status> {
    driver.node().await.node_publish_volume(request).await
}

async fn unpublish(
    driver: &Driver,
    id: &str,
    target: &str,
) -> Result<Response<proto::NodeUnpublishVolumeResponse>, Status> {
    driver
        .node()
        .await
        .node_unpublish_volume(proto::NodeUnpublishVolumeRequest {
            volume_id: id.to_string(),
            target_path: target.to_string(),
        })
        .await
}

async fn stats(
    driver: &Driver,
    id: &str,
    path: &str,
) -> Result<Response<proto::NodeGetVolumeStatsResponse>, Status> {
    driver
        .node()
        .await
        .node_get_volume_stats(proto::NodeGetVolumeStatsRequest {
            volume_id: id.to_string(),
            volume_path: path.to_string(),
            staging_target_path: String::new(),
        })
        .await
}

fn usage(response: &proto::NodeGetVolumeStatsResponse, unit: Unit) -> proto::VolumeUsage {
    response
        .usage
        .iter()
        .find(|u| u.unit == unit as i32)
        .copied()
        .unwrap_or_else(|| panic!("no {unit:?} usage in {response:?}"))
}

/// Names of the entries of `<data-dir>/volumes`.
fn volume_dirs(driver: &Driver) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(driver.data_dir().join("volumes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn volume_dir(driver: &Driver, id: &str) -> PathBuf {
    driver.data_dir().join("volumes").join(id)
}

/// How many mounts are stacked on `path`.
fn mount_count(path: &Path) -> usize {
    k8scsi::mount::mountinfo::read()
        .unwrap()
        .iter()
        .filter(|e| e.mount_point == path)
        .count()
}

fn is_empty_dir(path: &Path) -> bool {
    std::fs::read_dir(path).unwrap().next().is_none()
}

fn mount_flags(path: &Path) -> rustix::fs::StatVfsMountFlags {
    rustix::fs::statvfs(path).unwrap().f_flag
}

/// A `k8scsi serve` command line with its directories under `dir`, listening on `socket`.
fn serve_command(dir: &Path, socket: &Path) -> Command {
    let mut command = Command::new(BINARY);
    command
        .arg("serve")
        .arg("--endpoint")
        .arg(format!("unix://{}", socket.display()))
        .arg("--node-id")
        .arg("node-1")
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--kubelet-dir")
        .arg(dir.join("kubelet"));
    command
}

/// Runs a command that is expected to exit on its own, killing it after `timeout`.
fn run_to_exit(mut command: Command, timeout: Duration) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + timeout;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!(
                "command did not exit within {timeout:?}; stderr: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// SIGTERMs the driver and waits for it to exit; SIGKILLs it (failing the exit status) if it
/// takes longer than `limit`.
fn stop_within(driver: &mut Driver, limit: Duration) -> std::process::ExitStatus {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let done = Arc::new(AtomicBool::new(false));
    let pid = driver.pid() as i32;
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + limit;
            while Instant::now() < deadline {
                if done.load(Ordering::SeqCst) {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if done.load(Ordering::SeqCst) {
                return false;
            }
            let pid = rustix::process::Pid::from_raw(pid).unwrap();
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            true
        })
    };
    let status = driver.stop();
    done.store(true, Ordering::SeqCst);
    let killed = watchdog.join().unwrap();
    assert!(
        !killed,
        "k8scsi did not exit within {limit:?} of SIGTERM: {}",
        driver.log()
    );
    status
}

/// Runs a program, retrying ETXTBSY (another test thread may briefly hold the file open in a
/// child it is forking).
fn exec(program: &Path) -> std::io::Result<std::process::ExitStatus> {
    for _ in 0..50 {
        match Command::new(program).status() {
            Err(e) if e.raw_os_error() == Some(ETXTBSY) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            other => return other,
        }
    }
    Command::new(program).status()
}

async fn plugin_services(driver: &Driver) -> BTreeSet<i32> {
    use proto::plugin_capability::Type;
    driver
        .identity()
        .await
        .get_plugin_capabilities(proto::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .into_iter()
        .filter_map(|c| match c.r#type {
            Some(Type::Service(s)) => Some(s.r#type),
            _ => None,
        })
        .collect()
}

async fn controller_capabilities(driver: &Driver) -> BTreeSet<i32> {
    use proto::controller_service_capability::Type;
    driver
        .controller()
        .await
        .controller_get_capabilities(proto::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .into_iter()
        .filter_map(|c| c.r#type.map(|Type::Rpc(r)| r.r#type))
        .collect()
}

// ----- Identity -----

#[tokio::test]
async fn identity_reports_name_version_capabilities_and_readiness() {
    let d = Driver::start();
    let mut identity = d.identity().await;
    let info = identity
        .get_plugin_info(proto::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "k8scsi");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));

    assert_eq!(
        plugin_services(&d).await,
        BTreeSet::from([
            PluginCap::ControllerService as i32,
            PluginCap::GroupControllerService as i32,
            PluginCap::VolumeAccessibilityConstraints as i32
        ])
    );
    let probe = identity
        .probe(proto::ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true));

    let controller = controller_capabilities(&d).await;
    for wanted in [
        CtrlCap::CreateDeleteVolume,
        CtrlCap::ListVolumes,
        CtrlCap::GetCapacity,
        CtrlCap::GetVolume,
        CtrlCap::VolumeCondition,
        CtrlCap::ListVolumesPublishedNodes,
        CtrlCap::CreateDeleteSnapshot,
        CtrlCap::ListSnapshots,
        CtrlCap::GetSnapshot,
        CtrlCap::CloneVolume,
    ] {
        assert!(controller.contains(&(wanted as i32)), "{wanted:?} missing");
    }
    assert!(!controller.contains(&(CtrlCap::PublishUnpublishVolume as i32)));

    let node: BTreeSet<i32> = d
        .node()
        .await
        .node_get_capabilities(proto::NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .into_iter()
        .filter_map(|c| {
            c.r#type
                .map(|proto::node_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect();
    assert!(node.contains(&(NodeCap::GetVolumeStats as i32)));
    assert!(node.contains(&(NodeCap::VolumeCondition as i32)));
    // Staging (a no-op for directory volumes, a mount for loop volumes) and node expansion.
    assert!(node.contains(&(NodeCap::StageUnstageVolume as i32)));
    assert!(node.contains(&(NodeCap::ExpandVolume as i32)));
}

#[tokio::test]
async fn driver_name_can_be_overridden_and_is_validated() {
    let d = Driver::start_with(&["--driver-name", "hostpath.example.com"]);
    let info = d
        .identity()
        .await
        .get_plugin_info(proto::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "hostpath.example.com");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));

    // A name CSI forbids is refused at start-up.
    let scratch = tempfile::tempdir().unwrap();
    let mut bad = serve_command(scratch.path(), &scratch.path().join("csi.sock"));
    bad.arg("--driver-name").arg("bad/name");
    let output = run_to_exit(bad, Duration::from_secs(10));
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("driver name"), "stderr: {stderr}");
}

#[tokio::test]
async fn node_mode_serves_no_controller() {
    let d = Driver::start_with(&["--mode", "node"]);
    assert_eq!(
        plugin_services(&d).await,
        BTreeSet::from([PluginCap::VolumeAccessibilityConstraints as i32])
    );
    let mut controller = d.controller().await;
    expect_code(
        controller.create_volume(create_request("pvc-1", MIB)).await,
        Code::Unimplemented,
    );
    expect_code(
        controller
            .controller_get_capabilities(proto::ControllerGetCapabilitiesRequest {})
            .await,
        Code::Unimplemented,
    );
    let info = d
        .node()
        .await
        .node_get_info(proto::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "node-1");
    let probe = d
        .identity()
        .await
        .probe(proto::ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true));
}

#[tokio::test]
async fn controller_mode_serves_no_node() {
    let d = Driver::start_with(&["--mode", "controller"]);
    assert!(
        plugin_services(&d)
            .await
            .contains(&(PluginCap::ControllerService as i32))
    );
    expect_code(
        d.node()
            .await
            .node_get_info(proto::NodeGetInfoRequest {})
            .await,
        Code::Unimplemented,
    );
    // A controller-only process does not know where volumes are published.
    let caps = controller_capabilities(&d).await;
    assert!(caps.contains(&(CtrlCap::CreateDeleteVolume as i32)));
    assert!(!caps.contains(&(CtrlCap::ListVolumesPublishedNodes as i32)));
    create(&mut d.controller().await, "pvc-1", MIB).await;
}

// ----- CreateVolume -----

#[tokio::test]
async fn create_volume_is_idempotent_by_name() {
    let d = Driver::start();
    let mut c = d.controller().await;
    let first = create(&mut c, "pvc-1", 10 * MIB).await;
    assert_eq!(first.capacity_bytes, 10 * MIB);
    assert!(
        first.volume_id.starts_with("dir-"),
        "volume ID {:?}",
        first.volume_id
    );
    let again = create(&mut c, "pvc-1", 10 * MIB).await;
    assert_eq!(again, first);
    assert_eq!(volume_dirs(&d), vec![first.volume_id.clone()]);
    assert!(volume_dir(&d, &first.volume_id).is_dir());

    // A smaller request is satisfied by the existing volume.
    let smaller = create(&mut c, "pvc-1", MIB).await;
    assert_eq!(smaller.volume_id, first.volume_id);
    assert_eq!(smaller.capacity_bytes, 10 * MIB);

    // A bigger one is not: same name, incompatible volume.
    let status = expect_code(
        c.create_volume(create_request("pvc-1", 20 * MIB)).await,
        Code::AlreadyExists,
    );
    assert_mentions(&status, "pvc-1");
    // Neither is a limit below the existing size.
    let mut limited = create_request("pvc-1", 0);
    limited.capacity_range = Some(proto::CapacityRange {
        required_bytes: 0,
        limit_bytes: MIB,
    });
    expect_code(c.create_volume(limited).await, Code::AlreadyExists);

    // An explicit `type: dir` is accepted, and is idempotent too.
    let mut typed = create_request("pvc-2", MIB);
    typed
        .parameters
        .insert("type".to_string(), "dir".to_string());
    let v2 = c.create_volume(typed.clone()).await.unwrap().into_inner();
    let v2again = c.create_volume(typed).await.unwrap().into_inner();
    assert_eq!(v2.volume, v2again.volume);

    // Provisioner metadata is accepted and does not affect idempotency.
    let mut with_metadata = create_request("pvc-1", 10 * MIB);
    with_metadata.parameters.extend([
        (
            "csi.storage.k8s.io/pvc/name".to_string(),
            "data".to_string(),
        ),
        (
            "csi.storage.k8s.io/pvc/namespace".to_string(),
            "default".to_string(),
        ),
    ]);
    let v1 = c.create_volume(with_metadata).await.unwrap().into_inner();
    assert_eq!(v1.volume.unwrap().volume_id, first.volume_id);

    assert_eq!(volume_dirs(&d).len(), 2);
    assert_eq!(list_all_ids(&mut c).await.len(), 2);
}

/// Parameters that only spell out a default (`type: dir`, `allocation: sparse`) are the same
/// volume as leaving them out, on a repeated CreateVolume and in ValidateVolumeCapabilities.
#[tokio::test]
async fn explicit_default_parameters_are_the_same_volume() {
    let d = Driver::start();
    let mut c = d.controller().await;
    let first = create(&mut c, "defaults", MIB).await;
    let mut explicit = create_request("defaults", MIB);
    explicit.parameters.extend([
        ("type".to_string(), "dir".to_string()),
        ("allocation".to_string(), "sparse".to_string()),
    ]);
    let again = common::create_ok(&mut c, explicit.clone()).await;
    assert_eq!(again.volume_id, first.volume_id);
    // And the other way round: made explicit, repeated without them.
    let mut other = explicit.clone();
    other.name = "defaults-explicit".into();
    let made = common::create_ok(&mut c, other).await;
    let again = create(&mut c, "defaults-explicit", MIB).await;
    assert_eq!(again.volume_id, made.volume_id);
    let answer = c
        .validate_volume_capabilities(proto::ValidateVolumeCapabilitiesRequest {
            volume_id: first.volume_id.clone(),
            volume_capabilities: explicit.volume_capabilities.clone(),
            parameters: explicit.parameters.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(answer.confirmed.is_some(), "{answer:?}");
    // A parameter that is not the default still differs.
    let mut preallocated = create_request("defaults", MIB);
    preallocated
        .parameters
        .insert("allocation".to_string(), "preallocate".to_string());
    expect_code(c.create_volume(preallocated).await, Code::AlreadyExists);
}

#[tokio::test]
async fn create_volume_rejects_invalid_arguments() {
    let d = Driver::start();
    let mut c = d.controller().await;

    let status = expect_code(
        c.create_volume(create_request("", MIB)).await,
        Code::InvalidArgument,
    );
    assert_mentions(&status, "name");

    let mut no_caps = create_request("pvc-1", MIB);
    no_caps.volume_capabilities.clear();
    let status = expect_code(c.create_volume(no_caps).await, Code::InvalidArgument);
    assert_mentions(&status, "volume_capabilities");

    let mut unknown = create_request("pvc-1", MIB);
    unknown.parameters = HashMap::from([("foo".to_string(), "bar".to_string())]);
    let status = expect_code(c.create_volume(unknown).await, Code::InvalidArgument);
    assert_mentions(&status, "foo");

    let mut bad_type = create_request("pvc-1", MIB);
    bad_type.parameters = HashMap::from([("type".to_string(), "lvm".to_string())]);
    expect_code(c.create_volume(bad_type).await, Code::InvalidArgument);

    let mut block = create_request("pvc-1", MIB);
    block.volume_capabilities = vec![block_capability()];
    let status = expect_code(c.create_volume(block).await, Code::InvalidArgument);
    assert_mentions(&status, "block");

    for mode in [
        Mode::MultiNodeMultiWriter,
        Mode::MultiNodeReaderOnly,
        Mode::MultiNodeSingleWriter,
    ] {
        let mut multi = create_request("pvc-1", MIB);
        multi.volume_capabilities = vec![capability(mode, &[])];
        expect_code(c.create_volume(multi).await, Code::InvalidArgument);
    }

    let mut no_mode = create_request("pvc-1", MIB);
    no_mode.volume_capabilities[0].access_mode = None;
    expect_code(c.create_volume(no_mode).await, Code::InvalidArgument);

    let mut bad_flag = create_request("pvc-1", MIB);
    bad_flag.volume_capabilities = vec![capability(Mode::SingleNodeWriter, &["source=/etc"])];
    expect_code(c.create_volume(bad_flag).await, Code::InvalidArgument);

    let status = expect_code(
        c.create_volume(create_request("pvc-1", -1)).await,
        Code::InvalidArgument,
    );
    assert_mentions(&status, "required_bytes");

    let mut from_snapshot = create_request("pvc-1", MIB);
    from_snapshot.volume_content_source = Some(proto::VolumeContentSource {
        r#type: Some(proto::volume_content_source::Type::Snapshot(
            proto::volume_content_source::SnapshotSource {
                snapshot_id: "snap-1".into(),
            },
        )),
    });
    // Not a snapshot ID we could have issued: it does not exist (tests/snapshots.rs has the
    // rest of content sources).
    expect_code(c.create_volume(from_snapshot).await, Code::NotFound);

    let mut mutable = create_request("pvc-1", MIB);
    mutable.mutable_parameters = HashMap::from([("iops".to_string(), "10".to_string())]);
    expect_code(c.create_volume(mutable).await, Code::InvalidArgument);

    let mut huge_params = create_request("pvc-1", MIB);
    huge_params.parameters = HashMap::from([("type".to_string(), "d".repeat(5000))]);
    expect_code(c.create_volume(huge_params).await, Code::InvalidArgument);
    let mut huge_secrets = create_request("pvc-1", MIB);
    huge_secrets.secrets = HashMap::from([("token".to_string(), "s".repeat(5000))]);
    let status = expect_code(c.create_volume(huge_secrets).await, Code::InvalidArgument);
    assert!(
        !status.message().contains("sss"),
        "secret values must not be echoed: {status:?}"
    );

    // Nothing of the above left anything behind.
    assert!(volume_dirs(&d).is_empty());
    assert!(list_all_ids(&mut c).await.is_empty());

    // The supported single-node modes are all fine.
    for (i, mode) in [
        Mode::SingleNodeWriter,
        Mode::SingleNodeReaderOnly,
        Mode::SingleNodeSingleWriter,
        Mode::SingleNodeMultiWriter,
    ]
    .into_iter()
    .enumerate()
    {
        let mut ok = create_request(&format!("mode-{i}"), MIB);
        ok.volume_capabilities = vec![capability(mode, &["noexec"])];
        c.create_volume(ok)
            .await
            .unwrap_or_else(|s| panic!("{mode:?}: {s:?}"));
    }
}

#[tokio::test]
async fn create_volume_checks_capacity() {
    let d = Driver::start();
    let mut c = d.controller().await;

    // Larger than the whole filesystem: can never be satisfied.
    let status = expect_code(
        c.create_volume(create_request("huge", i64::MAX)).await,
        Code::OutOfRange,
    );
    assert!(!status.message().is_empty());

    let mut inverted = create_request("inverted", 2 * MIB);
    inverted.capacity_range = Some(proto::CapacityRange {
        required_bytes: 2 * MIB,
        limit_bytes: MIB,
    });
    expect_code(c.create_volume(inverted).await, Code::OutOfRange);
    assert!(volume_dirs(&d).is_empty());

    // Only a limit: the volume gets the limit.
    let mut limit_only = create_request("limit-only", 0);
    limit_only.capacity_range = Some(proto::CapacityRange {
        required_bytes: 0,
        limit_bytes: 3 * MIB,
    });
    let v = c.create_volume(limit_only).await.unwrap().into_inner();
    assert_eq!(v.volume.unwrap().capacity_bytes, 3 * MIB);

    // No range at all is allowed.
    let mut unspecified = create_request("unspecified", 0);
    unspecified.capacity_range = None;
    c.create_volume(unspecified).await.unwrap();
}

#[tokio::test]
async fn an_expansion_larger_than_the_whole_filesystem_is_out_of_range() {
    let d = Driver::start();
    let mut c = d.controller().await;
    let volume = c
        .create_volume(create_request("grow-huge", MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let expand = |bytes: i64| proto::ControllerExpandVolumeRequest {
        volume_id: volume.volume_id.clone(),
        capacity_range: Some(proto::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        ..Default::default()
    };
    // Can never be satisfied, like a CreateVolume of that size: the CO must fix the range
    // (OUT_OF_RANGE), not retry (RESOURCE_EXHAUSTED).
    let status = expect_code(
        c.controller_expand_volume(expand(i64::MAX)).await,
        Code::OutOfRange,
    );
    assert_mentions(&status, "whole");
    // The record is unchanged: the volume still answers with its old size.
    let got = c
        .controller_get_volume(proto::ControllerGetVolumeRequest {
            volume_id: volume.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.volume.unwrap().capacity_bytes, MIB);
    let grown = c
        .controller_expand_volume(expand(2 * MIB))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 2 * MIB);
}

#[tokio::test]
async fn create_volume_checks_names() {
    let d = Driver::start();
    let mut c = d.controller().await;

    let status = expect_code(
        c.create_volume(create_request(&"n".repeat(129), MIB)).await,
        Code::InvalidArgument,
    );
    assert_mentions(&status, "name");
    create(&mut c, &"n".repeat(128), MIB).await;

    // 128 bytes of multi-byte characters are fine; 129 bytes are not.
    create(&mut c, &"é".repeat(64), MIB).await;
    expect_code(
        c.create_volume(create_request(&format!("x{}", "é".repeat(64)), MIB))
            .await,
        Code::InvalidArgument,
    );

    for bad in ["a\0b", "line\nbreak", "\u{7f}"] {
        expect_code(
            c.create_volume(create_request(bad, MIB)).await,
            Code::InvalidArgument,
        );
    }

    // Names never become paths: a hostile name is just a name.
    std::fs::create_dir_all(d.dir.path().join("etc")).unwrap();
    let v = create(&mut c, "../../etc", MIB).await;
    let digits = v.volume_id.strip_prefix("dir-").expect("dir- prefix");
    assert_eq!(digits.len(), 32);
    assert!(digits.bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(volume_dir(&d, &v.volume_id).is_dir());
    assert!(is_empty_dir(&d.dir.path().join("etc")));
    assert!(!d.data_dir().join("etc").exists());
    let names: Vec<_> = std::fs::read_dir(d.data_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let mut names: Vec<_> = names
        .iter()
        .map(|n| n.to_string_lossy().into_owned())
        .collect();
    // The trash of deleted plain directories exists where volumes are plain directories.
    names.retain(|n| n != "trash");
    names.sort();
    // `.k8scsi.lock` is the server's lock on its data directory.
    assert_eq!(
        names,
        vec![".k8scsi.lock", "images", "shares", "snapshots", "volumes"]
    );
    assert_eq!(volume_dirs(&d).len(), 3);
    for id in volume_dirs(&d) {
        assert!(id.starts_with("dir-") && id.len() == 36, "{id}");
    }
    // Same hostile name again: same volume.
    assert_eq!(create(&mut c, "../../etc", MIB).await, v);
}

// ----- Topology and capacity -----

#[tokio::test]
async fn volumes_are_accessible_from_this_node_only() {
    let d = Driver::start();
    let mut c = d.controller().await;
    let v = create(&mut c, "pvc-1", MIB).await;
    assert_eq!(v.accessible_topology, vec![segment(TOPOLOGY_KEY, "node-1")]);

    let mut elsewhere = create_request("pvc-2", MIB);
    elsewhere.accessibility_requirements = Some(proto::TopologyRequirement {
        requisite: vec![segment(TOPOLOGY_KEY, "node-2")],
        preferred: vec![segment(TOPOLOGY_KEY, "node-2")],
    });
    let status = expect_code(c.create_volume(elsewhere).await, Code::ResourceExhausted);
    assert_mentions(&status, "node-1");
    assert_eq!(volume_dirs(&d).len(), 1);

    // One acceptable segment among several is enough.
    let mut either = create_request("pvc-3", MIB);
    either.accessibility_requirements = Some(proto::TopologyRequirement {
        requisite: vec![
            segment(TOPOLOGY_KEY, "node-2"),
            segment(TOPOLOGY_KEY, "node-1"),
        ],
        preferred: vec![segment(TOPOLOGY_KEY, "node-2")],
    });
    let v3 = c
        .create_volume(either)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        v3.accessible_topology,
        vec![segment(TOPOLOGY_KEY, "node-1")]
    );

    // Keys the CO adds (hostname labels) do not disqualify the node.
    let mut with_extra_key = create_request("pvc-4", MIB);
    let mut seg = segment(TOPOLOGY_KEY, "node-1");
    seg.segments
        .insert("kubernetes.io/hostname".into(), "host-a".into());
    with_extra_key.accessibility_requirements = Some(proto::TopologyRequirement {
        requisite: vec![seg.clone()],
        preferred: vec![seg],
    });
    c.create_volume(with_extra_key).await.unwrap();

    let info = d
        .node()
        .await
        .node_get_info(proto::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "node-1");
    assert_eq!(
        info.accessible_topology,
        Some(segment(TOPOLOGY_KEY, "node-1"))
    );
    assert_eq!(info.max_volumes_per_node, 0);
}

#[tokio::test]
async fn get_capacity_follows_topology_and_capabilities() {
    let d = Driver::start();
    let mut c = d.controller().await;
    let own = c
        .get_capacity(proto::GetCapacityRequest {
            parameters: common::unenforced(),
            accessible_topology: Some(segment(TOPOLOGY_KEY, "node-1")),
            volume_capabilities: vec![capability(Mode::SingleNodeWriter, &[])],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(own.available_capacity > 0, "{own:?}");
    assert!(own.maximum_volume_size.unwrap_or(0) > 0, "{own:?}");

    let unconstrained = c
        .get_capacity(proto::GetCapacityRequest {
            parameters: common::unenforced(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(unconstrained.available_capacity > 0);

    let other = c
        .get_capacity(proto::GetCapacityRequest {
            parameters: common::unenforced(),
            accessible_topology: Some(segment(TOPOLOGY_KEY, "node-2")),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(other.available_capacity, 0);

    let multi = c
        .get_capacity(proto::GetCapacityRequest {
            parameters: common::unenforced(),
            volume_capabilities: vec![capability(Mode::MultiNodeMultiWriter, &[])],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(multi.available_capacity, 0);

    let status = expect_code(
        c.get_capacity(proto::GetCapacityRequest {
            parameters: HashMap::from([("foo".to_string(), "1".to_string())]),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
    );
    assert_mentions(&status, "foo");
}

#[tokio::test]
async fn topology_key_and_volume_limit_can_be_configured() {
    let d = Driver::start_with(&[
        "--topology-key",
        "example.com/node",
        "--max-volumes-per-node",
        "7",
    ]);
    let mut c = d.controller().await;
    let v = create(&mut c, "pvc-1", MIB).await;
    assert_eq!(
        v.accessible_topology,
        vec![segment("example.com/node", "node-1")]
    );

    // The default key no longer names this node.
    let mut old_key = create_request("pvc-2", MIB);
    old_key.accessibility_requirements = Some(proto::TopologyRequirement {
        requisite: vec![segment(TOPOLOGY_KEY, "node-1")],
        preferred: vec![],
    });
    expect_code(c.create_volume(old_key).await, Code::ResourceExhausted);

    let mut new_key = create_request("pvc-3", MIB);
    new_key.accessibility_requirements = Some(proto::TopologyRequirement {
        requisite: vec![segment("example.com/node", "node-1")],
        preferred: vec![],
    });
    c.create_volume(new_key).await.unwrap();

    let info = d
        .node()
        .await
        .node_get_info(proto::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        info.accessible_topology,
        Some(segment("example.com/node", "node-1"))
    );
    assert_eq!(info.max_volumes_per_node, 7);

    let cap = c
        .get_capacity(proto::GetCapacityRequest {
            parameters: common::unenforced(),
            accessible_topology: Some(segment("example.com/node", "node-1")),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(cap.available_capacity > 0);
}

// ----- ValidateVolumeCapabilities -----

#[tokio::test]
async fn validate_volume_capabilities() {
    let d = Driver::start();
    let mut c = d.controller().await;
    let v = create(&mut c, "pvc-1", MIB).await;
    let request = |caps: Vec<VolumeCapability>| proto::ValidateVolumeCapabilitiesRequest {
        volume_id: v.volume_id.clone(),
        volume_capabilities: caps,
        ..Default::default()
    };
    let ok = c
        .validate_volume_capabilities(request(vec![capability(Mode::SingleNodeWriter, &[])]))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.confirmed.is_some(), "{ok:?}");

    let no = c
        .validate_volume_capabilities(request(vec![capability(Mode::MultiNodeMultiWriter, &[])]))
        .await
        .unwrap()
        .into_inner();
    assert!(no.confirmed.is_none());
    assert!(!no.message.is_empty());

    let block = c
        .validate_volume_capabilities(request(vec![block_capability()]))
        .await
        .unwrap()
        .into_inner();
    assert!(block.confirmed.is_none());

    expect_code(
        c.validate_volume_capabilities(request(vec![])).await,
        Code::InvalidArgument,
    );
    let mut unknown = request(vec![capability(Mode::SingleNodeWriter, &[])]);
    unknown.volume_id = UNKNOWN_ID.to_string();
    expect_code(
        c.validate_volume_capabilities(unknown).await,
        Code::NotFound,
    );
}

// ----- DeleteVolume -----

#[tokio::test]
async fn delete_volume_is_idempotent_and_removes_storage() {
    let d = Driver::start();
    let mut c = d.controller().await;
    let v = create(&mut c, "pvc-1", MIB).await;
    let keep = create(&mut c, "pvc-keep", MIB).await;
    std::fs::write(volume_dir(&d, &v.volume_id).join("data"), b"x").unwrap();

    delete(&mut c, &v.volume_id).await.unwrap();
    assert!(!volume_dir(&d, &v.volume_id).exists());
    assert_eq!(volume_dirs(&d), vec![keep.volume_id.clone()]);
    assert_eq!(list_all_ids(&mut c).await, vec![keep.volume_id.clone()]);
    expect_code(get_volume(&mut c, &v.volume_id).await, Code::NotFound);

    // Twice is fine, and so is something that never existed.
    delete(&mut c, &v.volume_id).await.unwrap();
    delete(&mut c, UNKNOWN_ID).await.unwrap();

    // The name is free again: a new, empty volume with the same (name-derived) ID.
    let again = create(&mut c, "pvc-1", 2 * MIB).await;
    assert_eq!(again.volume_id, v.volume_id);
    assert_eq!(again.capacity_bytes, 2 * MIB);
    assert!(is_empty_dir(&volume_dir(&d, &again.volume_id)));

    let status = expect_code(
        delete(&mut c, "").await.map(Response::new),
        Code::InvalidArgument,
    );
    assert_mentions(&status, "volume_id");
    expect_code(
        delete(&mut c, &"d".repeat(129)).await.map(Response::new),
        Code::InvalidArgument,
    );
}

/// Deleted directories in the data directory's trash (inside its `bin-*` directories, or at its
/// top level where a version without bins left them), or `None` where volumes are not plain
/// directories.
fn trash_entries(driver: &Driver) -> Option<usize> {
    let trash = driver.data_dir().join("trash");
    trash.exists().then(|| {
        std::fs::read_dir(trash)
            .unwrap()
            .map(|entry| {
                let path = entry.unwrap().path();
                if path
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("bin-")
                {
                    std::fs::read_dir(path).unwrap().count()
                } else {
                    1
                }
            })
            .sum()
    })
}

async fn wait_for_empty_trash(driver: &Driver) {
    for _ in 0..600 {
        if trash_entries(driver) == Some(0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "the trash is still not empty: {:?} entries",
        trash_entries(driver)
    );
}

#[tokio::test]
async fn deleting_a_full_volume_answers_before_its_tree_is_removed() {
    let mut d = Driver::start();
    let mut c = d.controller().await;
    if trash_entries(&d).is_none() {
        eprintln!("skipping: volumes here are not plain directories (no trash)");
        return;
    }
    // 20,000 files in 100 directories, as a pod would leave them.
    let v = create(&mut c, "pvc-full", MIB).await;
    let root = volume_dir(&d, &v.volume_id);
    for i in 0..100 {
        let dir = root.join(format!("d{i}"));
        std::fs::create_dir(&dir).unwrap();
        for j in 0..200 {
            std::fs::write(dir.join(format!("f{j}")), b"tenant data").unwrap();
        }
    }
    let started = Instant::now();
    delete(&mut c, &v.volume_id).await.unwrap();
    let answered = started.elapsed();
    assert!(
        !root.exists(),
        "the volume left volumes/ before DeleteVolume answered"
    );
    expect_code(get_volume(&mut c, &v.volume_id).await, Code::NotFound);
    wait_for_empty_trash(&d).await;
    eprintln!(
        "DeleteVolume of 20,000 files answered in {answered:?}; the tree was gone after {:?}",
        started.elapsed()
    );

    // What a stopped driver left in the trash is removed after the next start.
    d.stop();
    let trash = d.data_dir().join("trash");
    let left = [
        trash.join("bin-7/left-by-a-crash"),
        trash.join("left-by-an-older-version"),
    ];
    for dir in &left {
        std::fs::create_dir_all(dir.join("deep/er")).unwrap();
        std::fs::write(dir.join("deep/er/file"), b"x").unwrap();
    }
    d.restart();
    wait_for_empty_trash(&d).await;
    assert!(left.iter().all(|dir| !dir.exists()));
}

#[tokio::test]
async fn delete_volume_never_touches_paths_from_foreign_ids() {
    let d = Driver::start();
    let mut c = d.controller().await;
    let v = create(&mut c, "pvc-1", MIB).await;
    // Sentinels where a path built from the ID would land.
    let sentinels = [
        d.dir.path().join("etc/keep"),
        d.data_dir().join("etc/keep"),
        d.data_dir().join("volumes/dir-x/keep"),
    ];
    for s in &sentinels {
        std::fs::create_dir_all(s.parent().unwrap()).unwrap();
        std::fs::write(s, b"keep").unwrap();
    }
    for hostile in [
        "../../etc",
        "../etc",
        "dir-../../etc",
        "dir-x",
        "/etc",
        ".",
        "..",
        "dir-0123456789abcdef0123456789ABCDEF",
    ] {
        delete(&mut c, hostile)
            .await
            .unwrap_or_else(|s| panic!("DeleteVolume {hostile:?}: {s:?}"));
    }
    for s in &sentinels {
        assert_eq!(std::fs::read(s).unwrap(), b"keep", "{}", s.display());
    }
    assert!(volume_dir(&d, &v.volume_id).is_dir());
    assert_eq!(list_all_ids(&mut c).await, vec![v.volume_id.clone()]);
    assert!(Path::new("/etc/passwd").exists());
}

#[tokio::test]
async fn delete_of_a_published_volume_is_refused() {
    require_root!();
    let d = Driver::start();
    let mut c = d.controller().await;
    let v = create(&mut c, "pvc-1", MIB).await;
    let target = d.target("pod-a");
    publish(&d, publish_request(&v.volume_id, &target, false))
        .await
        .unwrap();
    std::fs::write(Path::new(&target).join("data"), b"precious").unwrap();

    let status = expect_code(
        delete(&mut c, &v.volume_id).await.map(Response::new),
        Code::FailedPrecondition,
    );
    assert_mentions(&status, &target);
    assert!(is_mounted(Path::new(&target)));
    assert_eq!(
        std::fs::read(volume_dir(&d, &v.volume_id).join("data")).unwrap(),
        b"precious"
    );

    unpublish(&d, &v.volume_id, &target).await.unwrap();
    delete(&mut c, &v.volume_id).await.unwrap();
    assert!(!volume_dir(&d, &v.volume_id).exists());
}

// ----- ListVolumes -----

#[tokio::test]
async fn list_volumes_pages_survive_concurrent_changes() {
    let d = Driver::start();
    let mut c = d.controller().await;
    let mut ids = Vec::new();
    for i in 0..25 {
        ids.push(create(&mut c, &format!("pvc-{i:02}"), MIB).await.volume_id);
    }

    // Everything in one page when max_entries is 0.
    let all = list(&mut c, 0, "").await.unwrap().into_inner();
    assert_eq!(all.entries.len(), 25);
    assert!(all.next_token.is_empty());
    for e in &all.entries {
        let status = e.status.as_ref().expect("status");
        assert!(status.published_node_ids.is_empty());
        assert!(!status.volume_condition.as_ref().unwrap().abnormal);
    }

    let page1 = list(&mut c, 10, "").await.unwrap().into_inner();
    assert_eq!(page1.entries.len(), 10);
    assert!(!page1.next_token.is_empty());
    let mut seen: Vec<String> = page1
        .entries
        .iter()
        .map(|e| e.volume.as_ref().unwrap().volume_id.clone())
        .collect();

    // Between pages: delete a volume already seen, the one the token points at and one further
    // on; create new ones.
    let unseen: Vec<&String> = ids.iter().filter(|id| !seen.contains(id)).collect();
    assert_eq!(unseen.len(), 15);
    let deleted_unseen = [unseen[0].clone(), unseen[7].clone()];
    delete(&mut c, &seen[0]).await.unwrap();
    for id in &deleted_unseen {
        delete(&mut c, id).await.unwrap();
    }
    let mut new_ids = Vec::new();
    for i in 0..3 {
        new_ids.push(create(&mut c, &format!("new-{i}"), MIB).await.volume_id);
    }

    let mut token = page1.next_token;
    let mut pages = 1;
    while !token.is_empty() {
        let page = list(&mut c, 10, &token)
            .await
            .unwrap_or_else(|s| panic!("ListVolumes with token {token:?}: {s:?}"))
            .into_inner();
        assert!(page.entries.len() <= 10);
        seen.extend(
            page.entries
                .iter()
                .map(|e| e.volume.as_ref().unwrap().volume_id.clone()),
        );
        token = page.next_token;
        pages += 1;
        if pages == 2 {
            new_ids.push(create(&mut c, "new-late", MIB).await.volume_id);
        }
        assert!(pages < 10, "pagination does not end");
    }

    let unique: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(
        unique.len(),
        seen.len(),
        "duplicates across pages: {seen:?}"
    );
    for id in ids.iter().filter(|id| !deleted_unseen.contains(id)) {
        assert!(unique.contains(id), "{id} missing from the listing");
    }
    for id in &deleted_unseen {
        assert!(!unique.contains(id), "deleted {id} was listed");
    }
    for id in &new_ids {
        assert!(unique.contains(id), "new volume {id} missing");
    }
    assert_eq!(seen.len(), 25 - 2 + 4);
}

#[tokio::test]
async fn list_volumes_rejects_bad_tokens_and_sizes() {
    let d = Driver::start();
    let mut c = d.controller().await;
    for i in 0..3 {
        create(&mut c, &format!("pvc-{i}"), MIB).await;
    }
    for bogus in ["abc", "999999", "0", "-1", "1.5", " 1"] {
        expect_code(list(&mut c, 1, bogus).await, Code::Aborted);
    }
    let status = expect_code(list(&mut c, -1, "").await, Code::InvalidArgument);
    assert_mentions(&status, "max_entries");

    // A valid token still works afterwards, and the last page has no token.
    let page = list(&mut c, 2, "").await.unwrap().into_inner();
    let last = list(&mut c, 2, &page.next_token)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(last.entries.len(), 1);
    assert!(last.next_token.is_empty());

    // An empty driver lists nothing.
    let empty = Driver::start();
    let page = list(&mut empty.controller().await, 5, "")
        .await
        .unwrap()
        .into_inner();
    assert!(page.entries.is_empty() && page.next_token.is_empty());
}

// ----- Restarts -----

// Multi-threaded so the dropped clients' connections close while `stop()` blocks this thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_survive_a_crash() {
    let mut d = Driver::start();
    let mut c = d.controller().await;
    let a = create(&mut c, "pvc-a", 5 * MIB).await;
    let b = create(&mut c, "pvc-b", MIB).await;
    let token = list(&mut c, 1, "").await.unwrap().into_inner().next_token;
    assert!(!token.is_empty());
    drop(c);

    d.kill();
    // SIGKILL leaves the socket file behind; the next start must replace it.
    assert!(d.socket().exists(), "kill should leave a stale socket");
    d.restart();

    let mut c = d.controller().await;
    assert_eq!(
        list_all_ids(&mut c).await,
        vec![a.volume_id.clone(), b.volume_id.clone()]
    );
    let got = get_volume(&mut c, &a.volume_id).await.unwrap().into_inner();
    assert_eq!(got.volume.as_ref().unwrap(), &a);
    let condition = got.status.unwrap().volume_condition.unwrap();
    assert!(!condition.abnormal, "{condition:?}");
    // Tokens issued before the crash stay valid.
    let rest = list(&mut c, 10, &token).await.unwrap().into_inner();
    assert_eq!(rest.entries.len(), 1);
    // Idempotency survives too.
    assert_eq!(create(&mut c, "pvc-a", 5 * MIB).await, a);
    expect_code(
        c.create_volume(create_request("pvc-a", 6 * MIB)).await,
        Code::AlreadyExists,
    );

    // A delete acknowledged before a crash stays done.
    delete(&mut c, &b.volume_id).await.unwrap();
    drop(c);
    d.restart();
    let mut c = d.controller().await;
    assert_eq!(list_all_ids(&mut c).await, vec![a.volume_id.clone()]);
    assert_eq!(volume_dirs(&d), vec![a.volume_id.clone()]);
    drop(c);

    // A clean stop exits 0 and removes the socket.
    let status = stop_within(&mut d, Duration::from_secs(10));
    assert!(status.success(), "{status:?}: {}", d.log());
    assert!(!d.socket().exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_down_with_a_connected_client() {
    let mut d = Driver::start();
    let mut c = d.controller().await;
    create(&mut c, "pvc-1", MIB).await;
    // The client stays connected (like the kubelet and the sidecars do).
    let status = stop_within(&mut d, Duration::from_secs(10));
    assert!(status.success(), "{status:?}: {}", d.log());
    assert!(!d.socket().exists());
    drop(c);
}

#[tokio::test]
async fn sigterm_shuts_down_despite_a_silent_connection() {
    let mut d = Driver::start();
    create(&mut d.controller().await, "pvc-1", MIB).await;
    // A local process that connects and never speaks HTTP/2 (or a client that froze): the
    // drain must be bounded, well inside the kubelet's 30 s termination grace period.
    let silent = std::os::unix::net::UnixStream::connect(d.socket()).unwrap();
    let status = stop_within(&mut d, Duration::from_secs(15));
    assert!(status.success(), "{status:?}: {}", d.log());
    drop(silent);
}

#[tokio::test]
async fn a_second_server_does_not_take_over_a_live_socket() {
    let d = Driver::start();
    let mut c = d.controller().await;
    let v = create(&mut c, "pvc-1", MIB).await;

    // Another server (own state) pointed at the same socket refuses to start.
    let other = tempfile::tempdir().unwrap();
    let second = serve_command(other.path(), &d.socket());
    let output = run_to_exit(second, Duration::from_secs(10));
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("listening"), "stderr: {stderr}");

    // The very same command line (same state too) fails as well.
    let output = run_to_exit(d.command(), Duration::from_secs(10));
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    // It trips over the state store's lock before it gets to the socket.
    assert!(
        stderr.contains("listening") || stderr.contains("lock"),
        "stderr: {stderr}"
    );

    // The first server is unharmed.
    assert!(d.socket().exists());
    let mut c = d.controller().await;
    assert_eq!(list_all_ids(&mut c).await, vec![v.volume_id.clone()]);
    let probe = d
        .identity()
        .await
        .probe(proto::ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true));
}

#[tokio::test]
async fn publications_survive_a_crash() {
    require_root!();
    let mut d = Driver::start();
    let mut c = d.controller().await;
    let v = create(&mut c, "pvc-1", MIB).await;
    let target = d.target("pod-a");
    publish(&d, publish_request(&v.volume_id, &target, false))
        .await
        .unwrap();
    drop(c);
    d.restart();

    let mut c = d.controller().await;
    let got = get_volume(&mut c, &v.volume_id).await.unwrap().into_inner();
    assert_eq!(got.status.unwrap().published_node_ids, vec!["node-1"]);
    expect_code(
        delete(&mut c, &v.volume_id).await.map(Response::new),
        Code::FailedPrecondition,
    );
    // The repeated publish the kubelet makes after a restart is still OK.
    publish(&d, publish_request(&v.volume_id, &target, false))
        .await
        .unwrap();
    assert_eq!(mount_count(Path::new(&target)), 1);
    unpublish(&d, &v.volume_id, &target).await.unwrap();
    assert!(!Path::new(&target).exists());
    delete(&mut c, &v.volume_id).await.unwrap();
}

// ----- NodePublishVolume / NodeUnpublishVolume -----

#[tokio::test]
async fn publish_bind_mounts_the_volume() {
    require_root!();
    let d = Driver::start();
    let mut c = d.controller().await;
    let v = create(&mut c, "pvc-1", MIB).await;
    let target = d.target("pod-a");
    let target_path = Path::new(&target);

    publish(&d, publish_request(&v.volume_id, &target, false))
        .await
        .unwrap();
    assert!(is_mounted(target_path));
    std::fs::write(target_path.join("hello.txt"), b"hello from the pod").unwrap();
    assert_eq!(
        std::fs::read(volume_dir(&d, &v.volume_id).join("hello.txt")).unwrap(),
        b"hello from the pod"
    );
    // A fresh volume is writable by any pod user.
    let mode = std::fs::metadata(target_path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o777, "{mode:o}");

    // The same call again is OK and does not stack a second mount.
    publish(&d, publish_request(&v.volume_id, &target, false))
        .await
        .unwrap();
    assert_eq!(mount_count(target_path), 1);

    // The same target with different options is a conflict.
    expect_code(
        publish(&d, publish_request(&v.volume_id, &target, true)).await,
        Code::AlreadyExists,
    );
    assert_eq!(mount_count(target_path), 1);

    let got = get_volume(&mut c, &v.volume_id).await.unwrap().into_inner();
    assert_eq!(got.status.unwrap().published_node_ids, vec!["node-1"]);
    let listed = list(&mut c, 0, "").await.unwrap().into_inner();
    assert_eq!(
        listed.entries[0]
            .status
            .as_ref()
            .unwrap()
            .published_node_ids,
        vec!["node-1"]
    );

    // SINGLE_NODE_WRITER allows a second publication on this node.
    let second = d.target("pod-b");
    publish(&d, publish_request(&v.volume_id, &second, false))
        .await
        .unwrap();
    assert!(Path::new(&second).join("hello.txt").exists());
    unpublish(&d, &v.volume_id, &second).await.unwrap();

    unpublish(&d, &v.volume_id, &target).await.unwrap();
    assert!(!is_mounted(target_path));
    assert!(!target_path.exists(), "target directory should be removed");
    // The data stays in the volume.
    assert!(volume_dir(&d, &v.volume_id).join("hello.txt").exists());
    // Again: nothing to do, still OK.
    unpublish(&d, &v.volume_id, &target).await.unwrap();
    let got = get_volume(&mut c, &v.volume_id).await.unwrap().into_inner();
    assert!(got.status.unwrap().published_node_ids.is_empty());
    delete(&mut c, &v.volume_id).await.unwrap();
}

#[tokio::test]
async fn readonly_publications_cannot_be_written() {
    require_root!();
    let d = Driver::start();
    let mut c = d.controller().await;
    let v = create(&mut c, "pvc-1", MIB).await;
    std::fs::write(volume_dir(&d, &v.volume_id).join("seed"), b"seed").unwrap();

    let target = d.target("pod-ro");
    publish(&d, publish_request(&v.volume_id, &target, true))
        .await
        .unwrap();
    let target_path = Path::new(&target);
    assert_eq!(std::fs::read(target_path.join("seed")).unwrap(), b"seed");
    let err = std::fs::write(target_path.join("new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(EROFS), "{err}");
    assert!(mount_flags(target_path).contains(rustix::fs::StatVfsMountFlags::RDONLY));
    // The backing directory itself stays writable.
    std::fs::write(volume_dir(&d, &v.volume_id).join("still-rw"), b"x").unwrap();

    // A reader-only access mode is mounted read-only even without the readonly flag.
    let reader = d.target("pod-reader");
    let mut request = publish_request(&v.volume_id, &reader, false);
    request.volume_capability = Some(capability(Mode::SingleNodeReaderOnly, &[]));
    publish(&d, request).await.unwrap();
    let err = std::fs::write(Path::new(&reader).join("new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(EROFS), "{err}");

    // A read-only "ro" mount flag too.
    let flagged = d.target("pod-ro-flag");
    let mut request = publish_request(&v.volume_id, &flagged, false);
    request.volume_capability = Some(capability(Mode::SingleNodeWriter, &["ro"]));
    publish(&d, request).await.unwrap();
    let err = std::fs::write(Path::new(&flagged).join("new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(EROFS), "{err}");

    for t in [&target, &reader, &flagged] {
        unpublish(&d, &v.volume_id, t).await.unwrap();
        assert!(!Path::new(t).exists());
    }
}

#[tokio::test]
async fn mount_flags_are_honoured() {
    require_root!();
    let d = Driver::start();
    let mut c = d.controller().await;
    let v = create(&mut c, "pvc-1", MIB).await;

    let plain = d.target("pod-plain");
    publish(&d, publish_request(&v.volume_id, &plain, false))
        .await
        .unwrap();
    let hardened = d.target("pod-hardened");
    let mut request = publish_request(&v.volume_id, &hardened, false);
    request.volume_capability = Some(capability(
        Mode::SingleNodeWriter,
        &["noexec", "nosuid,nodev", "noatime"],
    ));
    publish(&d, request.clone()).await.unwrap();
    // Idempotent with flags too.
    publish(&d, request).await.unwrap();
    assert_eq!(mount_count(Path::new(&hardened)), 1);

    use rustix::fs::StatVfsMountFlags as F;
    let flags = mount_flags(Path::new(&hardened));
    for wanted in [F::NOEXEC, F::NOSUID, F::NODEV, F::NOATIME] {
        assert!(flags.contains(wanted), "{wanted:?} missing from {flags:?}");
    }
    assert!(!flags.contains(F::RDONLY));
    assert!(!mount_flags(Path::new(&plain)).contains(F::NOEXEC));

    // A program in the volume runs through the plain mount but not through the noexec one.
    let program = Path::new(&plain).join("prog");
    std::fs::copy("/bin/true", &program).unwrap();
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert!(exec(&program).unwrap().success());
    let err = exec(&Path::new(&hardened).join("prog")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(EACCES), "{err}");
    // Writing still works through the hardened mount.
    std::fs::write(Path::new(&hardened).join("w"), b"x").unwrap();

    for t in [&plain, &hardened] {
        unpublish(&d, &v.volume_id, t).await.unwrap();
    }
}

#[tokio::test]
async fn unsupported_mount_flags_are_refused_before_mounting() {
    require_root!();
    let d = Driver::start();
    let mut c = d.controller().await;
    let v = create(&mut c, "pvc-1", MIB).await;
    let target = d.target("pod-a");
    for bad in ["source=/etc", "uid=0", "remount", "bogus", "noexec,move"] {
        let mut request = publish_request(&v.volume_id, &target, false);
        request.volume_capability = Some(capability(Mode::SingleNodeWriter, &[bad]));
        let status = expect_code(publish(&d, request).await, Code::InvalidArgument);
        let piece = bad.rsplit(',').next().unwrap();
        assert_mentions(&status, piece);
        assert!(!is_mounted(Path::new(&target)));
        assert!(!Path::new(&target).exists(), "{bad}: target was created");
    }

    let mut block = publish_request(&v.volume_id, &target, false);
    block.volume_capability = Some(block_capability());
    expect_code(publish(&d, block).await, Code::InvalidArgument);
    let mut multi = publish_request(&v.volume_id, &target, false);
    multi.volume_capability = Some(capability(Mode::MultiNodeMultiWriter, &[]));
    expect_code(publish(&d, multi).await, Code::InvalidArgument);
    let mut none = publish_request(&v.volume_id, &target, false);
    none.volume_capability = None;
    let status = expect_code(publish(&d, none).await, Code::InvalidArgument);
    assert_mentions(&status, "volume_capability");
    assert!(!Path::new(&target).exists());
}

#[tokio::test]
async fn single_node_single_writer_allows_one_publication() {
    require_root!();
    let d = Driver::start();
    let mut c = d.controller().await;
    let mut request = create_request("pvc-1", MIB);
    request.volume_capabilities = vec![capability(Mode::SingleNodeSingleWriter, &[])];
    let v = c
        .create_volume(request)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let sole = |target: &str| {
        let mut r = publish_request(&v.volume_id, target, false);
        r.volume_capability = Some(capability(Mode::SingleNodeSingleWriter, &[]));
        r
    };
    let a = d.target("pod-a");
    let b = d.target("pod-b");
    publish(&d, sole(&a)).await.unwrap();
    publish(&d, sole(&a)).await.unwrap();
    let status = expect_code(publish(&d, sole(&b)).await, Code::FailedPrecondition);
    assert_mentions(&status, &a);
    assert!(!is_mounted(Path::new(&b)));
    // Not even with a more permissive mode on the second target.
    expect_code(
        publish(&d, publish_request(&v.volume_id, &b, false)).await,
        Code::FailedPrecondition,
    );
    assert!(!is_mounted(Path::new(&b)));

    unpublish(&d, &v.volume_id, &a).await.unwrap();
    publish(&d, sole(&b)).await.unwrap();
    assert!(is_mounted(Path::new(&b)));
    unpublish(&d, &v.volume_id, &b).await.unwrap();
}

#[tokio::test]
async fn publish_of_a_missing_volume_is_not_found() {
    require_root!();
    let d = Driver::start();
    let mut c = d.controller().await;
    let target = d.target("pod-a");
    for id in [UNKNOWN_ID, "not-a-volume", "../../etc"] {
        expect_code(
            publish(&d, publish_request(id, &target, false)).await,
            Code::NotFound,
        );
    }
    let v = create(&mut c, "pvc-1", MIB).await;
    delete(&mut c, &v.volume_id).await.unwrap();
    expect_code(
        publish(&d, publish_request(&v.volume_id, &target, false)).await,
        Code::NotFound,
    );
    assert!(!Path::new(&target).exists());

    let status = expect_code(
        publish(&d, publish_request("", &target, false)).await,
        Code::InvalidArgument,
    );
    assert_mentions(&status, "volume_id");
    let status = expect_code(
        publish(&d, publish_request(UNKNOWN_ID, "", false)).await,
        Code::InvalidArgument,
    );
    assert_mentions(&status, "target_path");
    // Unpublishing something never published is fine.
    unpublish(&d, UNKNOWN_ID, &target).await.unwrap();
    expect_code(unpublish(&d, UNKNOWN_ID, "").await, Code::InvalidArgument);
}

#[tokio::test]
async fn unpublish_succeeds_when_the_target_is_already_gone() {
    require_root!();
    let d = Driver::start();
    let mut c = d.controller().await;
    let v = create(&mut c, "pvc-1", MIB).await;
    let pods = d.kubelet_dir().join("pods");

    // A publication whose mount vanished (a reboot, an unmount behind our back) leaves its
    // recorded, empty directory: it is cleaned up.
    let leftover = d.target("pod-leftover");
    publish(&d, publish_request(&v.volume_id, &leftover, false))
        .await
        .unwrap();
    rustix::mount::unmount(leftover.as_str(), rustix::mount::UnmountFlags::empty()).unwrap();
    unpublish(&d, &v.volume_id, &leftover).await.unwrap();
    assert!(!Path::new(&leftover).exists());

    // An empty directory the volume was never published at is not ours to remove.
    let stranger = d.target("pod-stranger");
    std::fs::create_dir(&stranger).unwrap();
    unpublish(&d, &v.volume_id, &stranger).await.unwrap();
    assert!(Path::new(&stranger).is_dir());

    // The kubelet already removed the pod directory: nothing to do.
    let gone = pods
        .join("pod-gone/volumes/kubernetes.io~csi/pv/mount")
        .to_string_lossy()
        .into_owned();
    unpublish(&d, &v.volume_id, &gone)
        .await
        .unwrap_or_else(|s| panic!("NodeUnpublishVolume of a vanished target: {s:?}"));

    // After a real publication, the kubelet's cleanup may race the retried unpublish.
    let target = d.target("pod-a");
    publish(&d, publish_request(&v.volume_id, &target, false))
        .await
        .unwrap();
    unpublish(&d, &v.volume_id, &target).await.unwrap();
    std::fs::remove_dir_all(pods.join("pod-a")).unwrap();
    unpublish(&d, &v.volume_id, &target)
        .await
        .unwrap_or_else(|s| panic!("repeated NodeUnpublishVolume: {s:?}"));
    delete(&mut c, &v.volume_id).await.unwrap();
}

// ----- Hostile target paths -----

#[tokio::test]
async fn targets_outside_the_kubelet_dir_are_refused() {
    require_root!();
    let d = Driver::start();
    let mut c = d.controller().await;
    let v = create(&mut c, "pvc-1", MIB).await;
    let outside = tempfile::tempdir().unwrap();
    let kubelet = d.kubelet_dir().to_string_lossy().into_owned();
    let candidates = [
        outside.path().join("x").to_string_lossy().into_owned(),
        "/etc".to_string(),
        "/".to_string(),
        kubelet.clone(),
        format!("{kubelet}x/pods/a/mount"),
        format!("{kubelet}/pods/../../x"),
        format!("{kubelet}/pods/a/../../../x"),
        format!("{kubelet}/pods/./a/mount"),
        format!("{kubelet}//pods/a/mount"),
        format!("{kubelet}/pods/a/mount/"),
        "pods/a/mount".to_string(),
    ];
    for target in &candidates {
        let status = expect_code(
            publish(&d, publish_request(&v.volume_id, target, false)).await,
            Code::InvalidArgument,
        );
        assert_mentions(&status, "target_path");
        expect_code(
            unpublish(&d, &v.volume_id, target).await,
            Code::InvalidArgument,
        );
    }
    assert!(!outside.path().join("x").exists());
    assert!(!d.dir.path().join("x").exists());
    assert!(!Path::new(&format!("{kubelet}x")).exists());
    assert!(!is_mounted(Path::new("/etc")));
    assert!(!is_mounted(&d.kubelet_dir()));
    let got = get_volume(&mut c, &v.volume_id).await.unwrap().into_inner();
    assert!(got.status.unwrap().published_node_ids.is_empty());
}

#[tokio::test]
async fn symlinks_in_target_paths_are_never_followed() {
    require_root!();
    let d = Driver::start();
    let mut c = d.controller().await;
    let v = create(&mut c, "pvc-1", MIB).await;
    let pods = d.kubelet_dir().join("pods");

    // A parent directory that is a symlink out of the kubelet tree.
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), pods.join("evil")).unwrap();
    let target = pods.join("evil/mount").to_string_lossy().into_owned();
    expect_code(
        publish(&d, publish_request(&v.volume_id, &target, false)).await,
        Code::InvalidArgument,
    );
    assert!(!outside.path().join("mount").exists());
    assert!(!is_mounted(&outside.path().join("mount")));

    // The same, deeper down, with the directories existing on the other side.
    std::fs::create_dir_all(outside.path().join("volumes/x")).unwrap();
    let deep = pods
        .join("evil/volumes/x/mount")
        .to_string_lossy()
        .into_owned();
    expect_code(
        publish(&d, publish_request(&v.volume_id, &deep, false)).await,
        Code::InvalidArgument,
    );
    assert!(!outside.path().join("volumes/x/mount").exists());

    // A target that is itself a symlink to a directory outside.
    let victim = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(pods.join("pod-link")).unwrap();
    let link = pods.join("pod-link/mount");
    std::os::unix::fs::symlink(victim.path(), &link).unwrap();
    let link_str = link.to_string_lossy().into_owned();
    expect_code(
        publish(&d, publish_request(&v.volume_id, &link_str, false)).await,
        Code::InvalidArgument,
    );
    assert!(!is_mounted(victim.path()));
    assert!(is_empty_dir(victim.path()));
    assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());

    // Symlinks inside the kubelet tree are refused as well.
    std::fs::create_dir_all(pods.join("real")).unwrap();
    std::os::unix::fs::symlink(pods.join("real"), pods.join("alias")).unwrap();
    let aliased = pods.join("alias/mount").to_string_lossy().into_owned();
    expect_code(
        publish(&d, publish_request(&v.volume_id, &aliased, false)).await,
        Code::InvalidArgument,
    );
    assert!(!pods.join("real/mount").exists());

    // Unpublish through a symlink does not unmount or delete what it points at.
    let real_target = d.target("pod-a");
    publish(&d, publish_request(&v.volume_id, &real_target, false))
        .await
        .unwrap();
    std::fs::create_dir_all(pods.join("pod-b")).unwrap();
    std::os::unix::fs::symlink(&real_target, pods.join("pod-b/mount")).unwrap();
    let via_link = pods.join("pod-b/mount").to_string_lossy().into_owned();
    expect_code(
        unpublish(&d, &v.volume_id, &via_link).await,
        Code::InvalidArgument,
    );
    assert!(is_mounted(Path::new(&real_target)));
    // Nor does unpublish through a symlinked parent reach the outside directory.
    std::fs::create_dir_all(outside.path().join("mount")).unwrap();
    expect_code(
        unpublish(&d, &v.volume_id, &target).await,
        Code::InvalidArgument,
    );
    assert!(outside.path().join("mount").is_dir());

    unpublish(&d, &v.volume_id, &real_target).await.unwrap();
    assert!(!Path::new(&real_target).exists());
    assert!(is_empty_dir(victim.path()));
}

#[tokio::test]
async fn a_foreign_mount_at_the_target_is_left_alone() {
    require_root!();
    let d = Driver::start();
    let mut c = d.controller().await;
    let a = create(&mut c, "pvc-a", MIB).await;
    let b = create(&mut c, "pvc-b", MIB).await;
    let target = d.target("pod-a");
    publish(&d, publish_request(&a.volume_id, &target, false))
        .await
        .unwrap();
    // Another volume cannot be published over it...
    expect_code(
        publish(&d, publish_request(&b.volume_id, &target, false)).await,
        Code::FailedPrecondition,
    );
    // ...and unpublishing the other volume there does not unmount the first.
    expect_code(
        unpublish(&d, &b.volume_id, &target).await,
        Code::FailedPrecondition,
    );
    assert_eq!(mount_count(Path::new(&target)), 1);
    std::fs::write(Path::new(&target).join("f"), b"a").unwrap();
    assert!(volume_dir(&d, &a.volume_id).join("f").exists());
    unpublish(&d, &a.volume_id, &target).await.unwrap();

    // A plain directory the volume was never published at is not touched on unpublish.
    let plain = d.target("pod-plain");
    std::fs::create_dir_all(&plain).unwrap();
    std::fs::write(Path::new(&plain).join("user-data"), b"keep").unwrap();
    unpublish(&d, &a.volume_id, &plain).await.unwrap();
    assert!(Path::new(&plain).join("user-data").exists());
}

// ----- NodeGetVolumeStats and volume health -----

#[tokio::test]
async fn volume_stats_report_usage_and_health() {
    require_root!();
    let d = Driver::start();
    let mut c = d.controller().await;
    let v = create(&mut c, "pvc-1", 64 * MIB).await;
    let target = d.target("pod-a");
    publish(&d, publish_request(&v.volume_id, &target, false))
        .await
        .unwrap();

    let before = stats(&d, &v.volume_id, &target).await.unwrap().into_inner();
    let bytes = usage(&before, Unit::Bytes);
    let inodes = usage(&before, Unit::Inodes);
    assert_eq!(bytes.total, 64 * MIB);
    assert!(
        bytes.available > 0 && bytes.available <= 64 * MIB,
        "{bytes:?}"
    );
    assert!(bytes.used >= 0 && bytes.used < MIB, "{bytes:?}");
    assert!(inodes.total > 0 && inodes.used >= 1, "{inodes:?}");
    let condition = before.volume_condition.clone().unwrap();
    assert!(!condition.abnormal, "{condition:?}");

    {
        use std::io::Write;
        let mut f = std::fs::File::create(Path::new(&target).join("blob")).unwrap();
        f.write_all(&vec![0x5a; MIB as usize]).unwrap();
        f.sync_all().unwrap();
    }
    let after = stats(&d, &v.volume_id, &target).await.unwrap().into_inner();
    let bytes_after = usage(&after, Unit::Bytes);
    assert!(
        bytes_after.used >= bytes.used + MIB,
        "before {bytes:?}, after {bytes_after:?}"
    );
    assert_eq!(bytes_after.total, 64 * MIB);
    assert!(bytes_after.available <= 63 * MIB);
    assert_eq!(usage(&after, Unit::Inodes).used, inodes.used + 1);

    // Paths where the volume is not published.
    let other = d.target("pod-other");
    expect_code(stats(&d, &v.volume_id, &other).await, Code::NotFound);
    expect_code(stats(&d, &v.volume_id, "/etc").await, Code::NotFound);
    expect_code(stats(&d, UNKNOWN_ID, &target).await, Code::NotFound);
    expect_code(stats(&d, "not-a-volume", &target).await, Code::NotFound);
    expect_code(stats(&d, &v.volume_id, "").await, Code::InvalidArgument);

    // The mount disappears behind our back: the volume is reported abnormal.
    rustix::mount::unmount(target.as_str(), rustix::mount::UnmountFlags::empty()).unwrap();
    assert!(Path::new(&target).is_dir());
    let broken = stats(&d, &v.volume_id, &target).await.unwrap().into_inner();
    let condition = broken.volume_condition.unwrap();
    assert!(condition.abnormal, "{condition:?}");
    assert!(!condition.message.is_empty());

    // The kubelet's repeated publish restores the mount, and the volume is healthy again.
    publish(&d, publish_request(&v.volume_id, &target, false))
        .await
        .unwrap();
    assert_eq!(mount_count(Path::new(&target)), 1);
    assert!(Path::new(&target).join("blob").exists());
    let healed = stats(&d, &v.volume_id, &target).await.unwrap().into_inner();
    assert!(!healed.volume_condition.unwrap().abnormal);

    unpublish(&d, &v.volume_id, &target).await.unwrap();
    assert!(!Path::new(&target).exists());
    expect_code(stats(&d, &v.volume_id, &target).await, Code::NotFound);
}

#[tokio::test]
async fn missing_backing_storage_is_reported_abnormal() {
    let d = Driver::start();
    let mut c = d.controller().await;
    let v = create(&mut c, "pvc-1", MIB).await;
    let healthy = create(&mut c, "pvc-2", MIB).await;
    std::fs::remove_dir_all(volume_dir(&d, &v.volume_id)).unwrap();

    let got = get_volume(&mut c, &v.volume_id).await.unwrap().into_inner();
    let condition = got.status.unwrap().volume_condition.unwrap();
    assert!(condition.abnormal, "{condition:?}");
    assert_mentions(&Status::unknown(condition.message.clone()), "missing");

    let listed = list(&mut c, 0, "").await.unwrap().into_inner();
    for entry in &listed.entries {
        let id = &entry.volume.as_ref().unwrap().volume_id;
        let abnormal = entry
            .status
            .as_ref()
            .unwrap()
            .volume_condition
            .as_ref()
            .unwrap()
            .abnormal;
        assert_eq!(abnormal, id == &v.volume_id, "{id}");
    }
    let got = get_volume(&mut c, &healthy.volume_id)
        .await
        .unwrap()
        .into_inner();
    assert!(!got.status.unwrap().volume_condition.unwrap().abnormal);

    // A retried CreateVolume gives the volume its storage back; delete still works.
    assert_eq!(create(&mut c, "pvc-1", MIB).await, v);
    assert!(volume_dir(&d, &v.volume_id).is_dir());
    let got = get_volume(&mut c, &v.volume_id).await.unwrap().into_inner();
    assert!(!got.status.unwrap().volume_condition.unwrap().abnormal);
    std::fs::remove_dir_all(volume_dir(&d, &v.volume_id)).unwrap();
    delete(&mut c, &v.volume_id).await.unwrap();
    expect_code(get_volume(&mut c, &v.volume_id).await, Code::NotFound);
}

#[tokio::test]
async fn probe_reports_an_unusable_data_directory() {
    let d = Driver::start();
    let mut identity = d.identity().await;
    let volumes = d.data_dir().join("volumes");
    let aside = d.data_dir().join("volumes-aside");
    std::fs::rename(&volumes, &aside).unwrap();
    let probe = identity.probe(proto::ProbeRequest {}).await;
    match probe {
        Ok(r) => assert_eq!(r.into_inner().ready, Some(false)),
        Err(s) => assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}"),
    }
    std::fs::rename(&aside, &volumes).unwrap();
    let probe = identity
        .probe(proto::ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true));
    create(&mut d.controller().await, "pvc-1", MIB).await;
}

// ----- Concurrency -----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_of_one_name_make_one_volume() {
    let d = Driver::start();
    let channel = d.channel().await;
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let mut c = ControllerClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            let first = c
                .create_volume(create_request("contended", 4 * MIB))
                .await
                .map(|r| r.into_inner().volume.unwrap().volume_id);
            let mut retried = first.clone();
            for _ in 0..200 {
                match &retried {
                    Err(s) if s.code() == Code::Aborted => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        retried = c
                            .create_volume(create_request("contended", 4 * MIB))
                            .await
                            .map(|r| r.into_inner().volume.unwrap().volume_id);
                    }
                    _ => break,
                }
            }
            (first, retried)
        }));
    }
    let mut ids = BTreeSet::new();
    let mut aborted = 0;
    for task in tasks {
        let (first, retried) = task.await.unwrap();
        match first {
            Ok(_) => {}
            Err(s) if s.code() == Code::Aborted => aborted += 1,
            Err(s) => panic!("unexpected status {s:?}"),
        }
        ids.insert(retried.unwrap_or_else(|s| panic!("retry never succeeded: {s:?}")));
    }
    assert_eq!(ids.len(), 1, "{ids:?}");
    eprintln!("{aborted} of 64 concurrent creates were aborted");
    let mut c = ControllerClient::new(channel);
    assert_eq!(
        list_all_ids(&mut c).await,
        ids.into_iter().collect::<Vec<_>>()
    );
    assert_eq!(volume_dirs(&d).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_and_deletes_of_many_names() {
    let d = Driver::start();
    let channel = d.channel().await;
    let mut tasks = Vec::new();
    for i in 0..64 {
        let mut c = ControllerClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            c.create_volume(create_request(&format!("pvc-{i}"), MIB))
                .await
                .map(|r| r.into_inner().volume.unwrap().volume_id)
        }));
    }
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(task.await.unwrap().unwrap());
    }
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), 64);
    let mut c = ControllerClient::new(channel.clone());
    assert_eq!(list_all_ids(&mut c).await.len(), 64);
    assert_eq!(volume_dirs(&d).len(), 64);

    // Delete half concurrently.
    let mut tasks = Vec::new();
    for id in ids.iter().step_by(2) {
        let id = id.clone();
        let mut c = ControllerClient::new(channel.clone());
        tasks.push(tokio::spawn(async move { delete(&mut c, &id).await }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let remaining: BTreeSet<String> = list_all_ids(&mut c).await.into_iter().collect();
    let expected: BTreeSet<String> = ids.iter().skip(1).step_by(2).cloned().collect();
    assert_eq!(remaining, expected);
    assert_eq!(
        volume_dirs(&d).into_iter().collect::<BTreeSet<_>>(),
        expected
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishes_of_one_target_mount_once() {
    require_root!();
    let d = Driver::start();
    let mut c = d.controller().await;
    let v = create(&mut c, "pvc-1", MIB).await;
    let target = d.target("pod-a");
    let channel = d.channel().await;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let mut node = k8scsi::csi::proto::node_client::NodeClient::new(channel.clone());
        let request = publish_request(&v.volume_id, &target, false);
        tasks.push(tokio::spawn(async move {
            node.node_publish_volume(request).await.map(|_| ())
        }));
    }
    let mut ok = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(()) => ok += 1,
            Err(s) if s.code() == Code::Aborted => {}
            Err(s) => panic!("unexpected status {s:?}"),
        }
    }
    assert!(ok >= 1);
    assert_eq!(mount_count(Path::new(&target)), 1);
    // SINGLE_NODE_SINGLE_WRITER races: exactly one target wins.
    let mut request = create_request("pvc-sole", MIB);
    request.volume_capabilities = vec![capability(Mode::SingleNodeSingleWriter, &[])];
    let sole = c
        .create_volume(request)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let mut tasks = Vec::new();
    let targets: Vec<String> = (0..8).map(|i| d.target(&format!("sole-{i}"))).collect();
    for t in &targets {
        let mut node = k8scsi::csi::proto::node_client::NodeClient::new(channel.clone());
        let mut request = publish_request(&sole.volume_id, t, false);
        request.volume_capability = Some(capability(Mode::SingleNodeSingleWriter, &[]));
        tasks.push(tokio::spawn(async move {
            node.node_publish_volume(request).await.map(|_| ())
        }));
    }
    for task in tasks {
        if let Err(s) = task.await.unwrap() {
            assert!(
                matches!(s.code(), Code::Aborted | Code::FailedPrecondition),
                "{s:?}"
            );
        }
    }
    let mounted: Vec<&String> = targets
        .iter()
        .filter(|t| is_mounted(Path::new(t.as_str())))
        .collect();
    assert_eq!(mounted.len(), 1, "{mounted:?}");
    unpublish(&d, &sole.volume_id, mounted[0]).await.unwrap();
    unpublish(&d, &v.volume_id, &target).await.unwrap();
    assert!(!is_mounted(Path::new(&target)));
}

// ----- Malformed wire data -----

/// A codec that sends and receives raw protobuf bytes, to put on the wire what the generated
/// clients never would.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

#[derive(Debug)]
struct RawEncoder;

#[derive(Debug)]
struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n).to_vec()))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

async fn raw_call(driver: &Driver, method: &'static str, body: Vec<u8>) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(driver.channel().await);
    grpc.ready().await.expect("channel ready");
    grpc.unary(
        Request::new(body),
        PathAndQuery::from_static(method),
        RawCodec,
    )
    .await
    .map(Response::into_inner)
}

/// A length-delimited protobuf field.
fn bytes_field(tag: u32, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(value.len() as u64, &mut out);
    out.extend_from_slice(value);
    out
}

const CREATE_VOLUME: &str = "/csi.v1.Controller/CreateVolume";
const NODE_PUBLISH: &str = "/csi.v1.Node/NodePublishVolume";

#[tokio::test]
async fn malformed_requests_are_invalid_arguments() {
    let d = Driver::start();

    // The raw path works for a well-formed request.
    let good = create_request("pvc-good", MIB).encode_to_vec();
    let reply = raw_call(&d, CREATE_VOLUME, good).await.unwrap();
    let reply = proto::CreateVolumeResponse::decode(reply.as_slice()).unwrap();
    let good_id = reply.volume.unwrap().volume_id;

    // `name` (field 1) holding invalid UTF-8, followed by a valid capability (field 3).
    let capability_bytes = capability(Mode::SingleNodeWriter, &[]).encode_to_vec();
    let mut bad_utf8 = bytes_field(1, b"pvc-\xff\xfe");
    bad_utf8.extend(bytes_field(3, &capability_bytes));
    let status = raw_call(&d, CREATE_VOLUME, bad_utf8).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // A length prefix that runs past the end of the message.
    let mut truncated = Vec::new();
    prost::encoding::encode_key(
        1,
        prost::encoding::WireType::LengthDelimited,
        &mut truncated,
    );
    prost::encoding::encode_varint(50, &mut truncated);
    truncated.extend_from_slice(b"abc");
    let status = raw_call(&d, CREATE_VOLUME, truncated).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // Garbage.
    let status = raw_call(&d, CREATE_VOLUME, vec![0xff; 16])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // Invalid UTF-8 in a node request's target_path (field 4).
    let target = d.target("pod-a");
    let mut publish_bytes = bytes_field(1, good_id.as_bytes());
    let mut bad_target = target.clone().into_bytes();
    bad_target.extend_from_slice(b"\xc0");
    publish_bytes.extend(bytes_field(4, &bad_target));
    publish_bytes.extend(bytes_field(5, &capability_bytes));
    let status = raw_call(&d, NODE_PUBLISH, publish_bytes).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(!Path::new(&target).exists());

    // Nothing was created by the malformed requests, and the server still serves.
    let mut c = d.controller().await;
    assert_eq!(list_all_ids(&mut c).await, vec![good_id.clone()]);
    assert_eq!(volume_dirs(&d), vec![good_id]);
    let probe = d
        .identity()
        .await
        .probe(proto::ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true));

    // Unknown methods are Unimplemented.
    let status = raw_call(&d, "/csi.v1.Controller/NoSuchMethod", vec![])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
}

// ----- Unimplemented optional RPCs -----

#[tokio::test]
async fn optional_rpcs_are_unimplemented() {
    let d = Driver::start();
    let mut c = d.controller().await;
    expect_code(
        c.controller_publish_volume(proto::ControllerPublishVolumeRequest::default())
            .await,
        Code::Unimplemented,
    );
    expect_code(
        c.controller_modify_volume(proto::ControllerModifyVolumeRequest::default())
            .await,
        Code::Unimplemented,
    );
    // Snapshots are implemented: an empty request is invalid, not unimplemented.
    expect_code(
        c.create_snapshot(proto::CreateSnapshotRequest::default())
            .await,
        Code::InvalidArgument,
    );
    // Node RPCs with missing fields are invalid, not unimplemented.
    let mut n = d.node().await;
    expect_code(
        n.node_stage_volume(proto::NodeStageVolumeRequest::default())
            .await,
        Code::InvalidArgument,
    );
    expect_code(
        n.node_expand_volume(proto::NodeExpandVolumeRequest::default())
            .await,
        Code::InvalidArgument,
    );
}
