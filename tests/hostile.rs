//! Hostile input against the real server: a target or its parent swapped for a symlink while
//! NodePublishVolume runs, path traversal and absolute paths in every string field, mount-option
//! injection, an oversized gRPC message, and ListVolumes pagination over 10,000 volumes while
//! others are created and deleted. What tests/integration.rs already covers (static symlinks,
//! targets outside the kubelet dir, foreign IDs in DeleteVolume, malformed protobuf) is not
//! repeated here.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Driver, create_request, publish_request};
use k8scsi::client::mount_capability;
use k8scsi::csi::proto::controller_client::ControllerClient;
use k8scsi::csi::proto::volume_capability::AccessType;
use k8scsi::csi::proto::volume_capability::access_mode::Mode;
use k8scsi::csi::proto::{self, VolumeCapability};
use tonic::Code;
use tonic::transport::Channel;

const MIB: i64 = 1 << 20;

fn env_u64(key: &str) -> Option<u64> {
    std::env::var(key).ok().map(|v| {
        v.trim()
            .parse()
            .unwrap_or_else(|e| panic!("{key}={v:?}: {e}"))
    })
}

async fn create_id(c: &mut ControllerClient<Channel>, name: &str) -> String {
    c.create_volume(create_request(name, MIB))
        .await
        .unwrap_or_else(|e| panic!("create {name}: {e:?}"))
        .into_inner()
        .volume
        .unwrap()
        .volume_id
}

/// Mount points at or below `dir`.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    k8scsi::mount::mountinfo::read()
        .unwrap()
        .into_iter()
        .map(|e| e.mount_point)
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// Atomically exchanges two directory entries (`renameat2(RENAME_EXCHANGE)`).
fn exchange(a: &Path, b: &Path) -> rustix::io::Result<()> {
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        a,
        rustix::fs::CWD,
        b,
        rustix::fs::RenameFlags::EXCHANGE,
    )
}

/// Swaps `a` and `b` back and forth until `stop`; returns whether they end up exchanged (a
/// directory that became a mount point cannot be moved: EBUSY stops the swapping).
fn swap_until(a: PathBuf, b: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<bool> {
    std::thread::spawn(move || {
        let mut swapped = false;
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) || swapped {
            match exchange(&a, &b) {
                Ok(()) => swapped = !swapped,
                Err(rustix::io::Errno::BUSY) if stop.load(Ordering::SeqCst) => break,
                Err(rustix::io::Errno::BUSY) => std::thread::yield_now(),
                Err(e) => panic!("exchange {} and {}: {e}", a.display(), b.display()),
            }
            n += 1;
            if n.is_multiple_of(64) {
                std::thread::yield_now();
            }
        }
        swapped
    })
}

/// A target's parent directory, and then the target itself, are swapped for symlinks to a
/// directory outside the kubelet dir over and over while NodePublishVolume runs. Whatever the
/// timing, nothing is ever mounted outside the kubelet dir and the outside directory stays
/// empty; a publish that succeeds landed inside, and unpublishes cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlink_swaps_during_publish_never_mount_outside_the_kubelet_dir() {
    require_root!();
    let rounds = env_u64("K8SCSI_HOSTILE_SWAP_ROUNDS").unwrap_or(150);
    let d = Driver::start();
    let mut c = d.controller().await;
    let mut node = d.node().await;
    let id = create_id(&mut c, "swap").await;
    let outside = tempfile::Builder::new()
        .prefix("k8scsi-outside-")
        .tempdir()
        .unwrap();
    std::fs::create_dir(outside.path().join("mount")).unwrap();
    let pods = d.kubelet_dir().join("pods");

    // Phase 1: the parent. `pods/race` is a real directory or a symlink to `outside`.
    // Phase 2: the target. `pods/pod-t/mount` is a real directory or a symlink to `outside/mount`.
    std::fs::create_dir_all(pods.join("race")).unwrap();
    std::os::unix::fs::symlink(outside.path(), pods.join("race-alt")).unwrap();
    std::fs::create_dir_all(pods.join("pod-t/mount")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("mount"), pods.join("pod-t/mount-alt")).unwrap();
    let phases = [
        (
            pods.join("race"),
            pods.join("race-alt"),
            pods.join("race/mount"),
        ),
        (
            pods.join("pod-t/mount"),
            pods.join("pod-t/mount-alt"),
            pods.join("pod-t/mount"),
        ),
    ];
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    for (a, b, target) in phases {
        let target_str = target.to_string_lossy().into_owned();
        for _ in 0..rounds {
            let stop = Arc::new(AtomicBool::new(false));
            let swapper = swap_until(a.clone(), b.clone(), stop.clone());
            let result = node
                .node_publish_volume(publish_request(&id, &target_str, false))
                .await;
            stop.store(true, Ordering::SeqCst);
            let swapped = swapper.join().unwrap();
            assert!(
                mounts_under(outside.path()).is_empty(),
                "mounted outside the kubelet dir: {:?} (publish said {result:?})",
                mounts_under(outside.path())
            );
            // A mount that landed on the real directory while it was swapped out (still inside
            // the kubelet dir) pins it there: take it down by hand and swap back.
            for point in mounts_under(&pods) {
                if point != target {
                    rustix::mount::unmount(&point, rustix::mount::UnmountFlags::DETACH).unwrap();
                }
            }
            if swapped {
                exchange(&a, &b).unwrap();
            }
            assert!(!std::fs::symlink_metadata(&a).unwrap().is_symlink());
            let key = match &result {
                Ok(_) => "OK".to_string(),
                Err(s) => format!("{:?}", s.code()),
            };
            *outcomes.entry(key).or_default() += 1;
            match result {
                Ok(_) => {
                    // Unpublish clears the mount (if it is still at the target) and the record.
                    let status = node
                        .node_unpublish_volume(proto::NodeUnpublishVolumeRequest {
                            volume_id: id.clone(),
                            target_path: target_str.clone(),
                        })
                        .await;
                    assert!(status.is_ok(), "{status:?}");
                    assert!(!common::is_mounted(&target));
                    std::fs::create_dir_all(&target).unwrap();
                }
                Err(status) => {
                    assert!(
                        matches!(
                            status.code(),
                            Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition
                        ),
                        "{status:?}"
                    );
                }
            }
            assert!(
                mounts_under(&pods).is_empty(),
                "left mounted: {:?}",
                mounts_under(&pods)
            );
        }
    }
    let left: Vec<_> = std::fs::read_dir(outside.path().join("mount"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "the outside directory was written to");
    eprintln!("symlink swap race: {rounds} publishes per phase, outcomes {outcomes:?}");
}

/// Loop devices whose backing file is under `dir`.
fn loops_under(dir: &Path) -> Vec<String> {
    let out = std::process::Command::new("losetup")
        .args(["-n", "-O", "NAME,BACK-FILE", "-l"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&*dir.to_string_lossy()))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

fn loop_tools_missing() -> Option<String> {
    if !common::is_root() {
        return Some("needs root (loop devices, mounts)".into());
    }
    for tool in ["losetup", "mkfs.ext4"] {
        if std::process::Command::new(tool).arg("-V").output().is_err() {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

/// The same race against NodeStageVolume's staging path, with an ext4 loop volume (whose
/// staging mounts the filesystem): the staging path's parent, and then the staging directory
/// itself, are swapped for symlinks to an outside directory while the stage runs. Nothing is
/// ever mounted outside the kubelet dir, the outside directory stays empty, a stage that
/// succeeds unstages cleanly, and no loop device of the test's image is left attached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlink_swaps_during_stage_never_mount_outside_the_kubelet_dir() {
    skip_unless_ready!(loop_tools_missing());
    let rounds = env_u64("K8SCSI_HOSTILE_STAGE_SWAP_ROUNDS").unwrap_or(40);
    let d = tokio::task::block_in_place(Driver::start);
    let mut c = d.controller().await;
    let mut node = d.node().await;
    let mut create = create_request("swap-stage", 16 * MIB);
    create.parameters = HashMap::from([("type".to_string(), "loop".to_string())]);
    create.volume_capabilities = vec![fs_capability("ext4", &[])];
    let id = c
        .create_volume(create)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let outside = tempfile::Builder::new()
        .prefix("k8scsi-outside-")
        .tempdir()
        .unwrap();
    std::fs::create_dir(outside.path().join("staging")).unwrap();
    let pods = d.kubelet_dir().join("pods");
    std::fs::create_dir_all(pods.join("stage-race")).unwrap();
    std::os::unix::fs::symlink(outside.path(), pods.join("stage-race-alt")).unwrap();
    std::fs::create_dir_all(pods.join("pod-s/staging")).unwrap();
    std::os::unix::fs::symlink(
        outside.path().join("staging"),
        pods.join("pod-s/staging-alt"),
    )
    .unwrap();
    let phases = [
        (
            pods.join("stage-race"),
            pods.join("stage-race-alt"),
            pods.join("stage-race/staging"),
        ),
        (
            pods.join("pod-s/staging"),
            pods.join("pod-s/staging-alt"),
            pods.join("pod-s/staging"),
        ),
    ];
    std::fs::create_dir_all(&phases[0].2).unwrap();
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    for (a, b, staging) in phases {
        let staging_str = staging.to_string_lossy().into_owned();
        for _ in 0..rounds {
            let stop = Arc::new(AtomicBool::new(false));
            let swapper = swap_until(a.clone(), b.clone(), stop.clone());
            let result = node
                .node_stage_volume(proto::NodeStageVolumeRequest {
                    volume_id: id.clone(),
                    staging_target_path: staging_str.clone(),
                    volume_capability: Some(fs_capability("ext4", &[])),
                    ..Default::default()
                })
                .await;
            stop.store(true, Ordering::SeqCst);
            let swapped = tokio::task::block_in_place(|| swapper.join().unwrap());
            assert!(
                mounts_under(outside.path()).is_empty(),
                "mounted outside the kubelet dir: {:?} (stage said {result:?})",
                mounts_under(outside.path())
            );
            // A mount that landed on the real directory while it was swapped out (inside the
            // kubelet dir) pins it there: take it down by hand and swap back.
            for point in mounts_under(&pods) {
                if point != staging {
                    rustix::mount::unmount(&point, rustix::mount::UnmountFlags::DETACH).unwrap();
                }
            }
            if swapped {
                exchange(&a, &b).unwrap();
            }
            assert!(!std::fs::symlink_metadata(&a).unwrap().is_symlink());
            let key = match &result {
                Ok(_) => "OK".to_string(),
                Err(s) => format!("{:?}", s.code()),
            };
            *outcomes.entry(key).or_default() += 1;
            if let Err(status) = &result {
                assert!(
                    matches!(
                        status.code(),
                        Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition
                    ),
                    "{status:?}"
                );
            }
            // Unstage whatever the answer: it clears a mount still at the staging path, the
            // loop device and any record; unstaging what is not staged is OK.
            let status = node
                .node_unstage_volume(proto::NodeUnstageVolumeRequest {
                    volume_id: id.clone(),
                    staging_target_path: staging_str.clone(),
                })
                .await;
            assert!(status.is_ok(), "{status:?}");
            assert!(!common::is_mounted(&staging));
            std::fs::create_dir_all(&staging).unwrap();
            assert!(
                mounts_under(&pods).is_empty(),
                "left mounted: {:?}",
                mounts_under(&pods)
            );
            tokio::task::block_in_place(|| {
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                while !loops_under(d.dir.path()).is_empty() {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "loop device left attached: {:?} (stage said {result:?})",
                        loops_under(d.dir.path())
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            });
        }
    }
    let left: Vec<_> = std::fs::read_dir(outside.path().join("staging"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "the outside directory was written to");
    eprintln!("symlink swap race on staging: {rounds} stages per phase, outcomes {outcomes:?}");
}

/// Everything below `dir` except the server's log and store, for "no effect on disk".
fn tree(dir: &Path) -> BTreeSet<PathBuf> {
    fn walk(dir: &Path, out: &mut BTreeSet<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            out.insert(p.clone());
            if e.file_type().unwrap().is_dir() {
                walk(&p, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, &mut out);
    out.retain(|p| {
        !p.ends_with("server.log") && !p.starts_with(dir.join("state")) && !p.ends_with("csi.sock")
    });
    out
}

fn fs_capability(fs_type: &str, flags: &[&str]) -> VolumeCapability {
    let mut cap = mount_capability(
        Mode::SingleNodeWriter,
        flags.iter().map(|s| s.to_string()).collect(),
    );
    if let Some(AccessType::Mount(m)) = cap.access_type.as_mut() {
        m.fs_type = fs_type.to_string();
    }
    cap
}

/// Path traversal, absolute paths, NUL bytes and option injection in every string field of
/// every call: each is refused (INVALID_ARGUMENT, or NOT_FOUND for an ID that cannot exist)
/// and nothing changes on disk or in the mount table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_strings_in_every_field_are_refused_without_effect() {
    require_root!();
    let d = Driver::start();
    let mut c = d.controller().await;
    let mut node = d.node().await;
    let id = create_id(&mut c, "victim").await;
    let staging = d.target("victim-staging");
    let target = d.target("victim");
    let kubelet = d.kubelet_dir().to_string_lossy().into_owned();
    let hostile_paths: Vec<String> = vec![
        "../../etc".into(),
        "/etc".into(),
        "/".into(),
        format!("{kubelet}/pods/../../escape"),
        format!("{kubelet}/pods/a\0b"),
        format!("{kubelet}/pods/{}", "x".repeat(5000)),
    ];
    let hostile_ids: Vec<String> = vec![
        "../../etc".into(),
        "/etc/passwd".into(),
        "dir-../../../etc".into(),
        "loop-../../x".into(),
        "dir-0123456789abcdef0123456789abcdef/../x".into(),
        "dir-\0".into(),
        "x".repeat(300),
    ];
    let hostile_values: Vec<String> = vec![
        "../../etc".into(),
        "/etc/passwd".into(),
        "a\0b".into(),
        "x".repeat(5000),
    ];
    let before = tree(d.dir.path());
    let mounts_before = mounts_under(d.dir.path());
    let mut codes: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut record = |what: &str, result: Result<(), tonic::Status>, allowed: &[Code]| {
        let code = match &result {
            Ok(()) => Code::Ok,
            Err(s) => s.code(),
        };
        assert!(
            allowed.contains(&code),
            "{what}: answered {result:?}, expected one of {allowed:?}"
        );
        codes
            .entry(what.split(':').next().unwrap().to_string())
            .or_default()
            .insert(format!("{code:?}"));
    };
    let refused = &[Code::InvalidArgument, Code::NotFound][..];

    for bad in &hostile_ids {
        let what = format!("ids: {bad:?}");
        let r = node
            .node_stage_volume(proto::NodeStageVolumeRequest {
                volume_id: bad.clone(),
                staging_target_path: staging.clone(),
                volume_capability: Some(fs_capability("", &[])),
                ..Default::default()
            })
            .await;
        record(
            &format!("NodeStage volume_id: {what}"),
            r.map(|_| ()),
            refused,
        );
        let r = node
            .node_publish_volume(publish_request(bad, &target, false))
            .await;
        record(
            &format!("NodePublish volume_id: {what}"),
            r.map(|_| ()),
            refused,
        );
        let r = node
            .node_get_volume_stats(proto::NodeGetVolumeStatsRequest {
                volume_id: bad.clone(),
                volume_path: target.clone(),
                staging_target_path: String::new(),
            })
            .await;
        record(
            &format!("NodeGetVolumeStats volume_id: {what}"),
            r.map(|_| ()),
            refused,
        );
        let r = node
            .node_expand_volume(proto::NodeExpandVolumeRequest {
                volume_id: bad.clone(),
                volume_path: target.clone(),
                ..Default::default()
            })
            .await;
        record(
            &format!("NodeExpand volume_id: {what}"),
            r.map(|_| ()),
            refused,
        );
        let r = c
            .controller_expand_volume(proto::ControllerExpandVolumeRequest {
                volume_id: bad.clone(),
                capacity_range: Some(proto::CapacityRange {
                    required_bytes: 2 * MIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await;
        record(
            &format!("ControllerExpand volume_id: {what}"),
            r.map(|_| ()),
            refused,
        );
        let r = c
            .validate_volume_capabilities(proto::ValidateVolumeCapabilitiesRequest {
                volume_id: bad.clone(),
                volume_capabilities: vec![fs_capability("", &[])],
                ..Default::default()
            })
            .await;
        record(
            &format!("ValidateVolumeCapabilities volume_id: {what}"),
            r.map(|_| ()),
            refused,
        );
        // Tearing down what cannot exist is a successful no-op (the CO may retry it), unless
        // the ID is malformed outright.
        let idempotent = &[Code::Ok, Code::InvalidArgument, Code::NotFound][..];
        let r = node
            .node_unpublish_volume(proto::NodeUnpublishVolumeRequest {
                volume_id: bad.clone(),
                target_path: target.clone(),
            })
            .await;
        record(
            &format!("NodeUnpublish volume_id: {what}"),
            r.map(|_| ()),
            idempotent,
        );
        let r = node
            .node_unstage_volume(proto::NodeUnstageVolumeRequest {
                volume_id: bad.clone(),
                staging_target_path: staging.clone(),
            })
            .await;
        record(
            &format!("NodeUnstage volume_id: {what}"),
            r.map(|_| ()),
            idempotent,
        );
    }

    for bad in &hostile_paths {
        let what = format!("paths: {:?}", &bad[..bad.len().min(80)]);
        let r = node
            .node_stage_volume(proto::NodeStageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: bad.clone(),
                volume_capability: Some(fs_capability("", &[])),
                ..Default::default()
            })
            .await;
        record(
            &format!("NodeStage staging_target_path: {what}"),
            r.map(|_| ()),
            &[Code::InvalidArgument],
        );
        let mut p = publish_request(&id, &target, false);
        p.staging_target_path = bad.clone();
        let r = node.node_publish_volume(p).await;
        record(
            &format!("NodePublish staging_target_path: {what}"),
            r.map(|_| ()),
            &[Code::InvalidArgument],
        );
        let r = node
            .node_unstage_volume(proto::NodeUnstageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: bad.clone(),
            })
            .await;
        record(
            &format!("NodeUnstage staging_target_path: {what}"),
            r.map(|_| ()),
            &[Code::InvalidArgument],
        );
        let r = node
            .node_get_volume_stats(proto::NodeGetVolumeStatsRequest {
                volume_id: id.clone(),
                volume_path: bad.clone(),
                staging_target_path: String::new(),
            })
            .await;
        record(
            &format!("NodeGetVolumeStats volume_path: {what}"),
            r.map(|_| ()),
            &[Code::InvalidArgument, Code::NotFound],
        );
        let r = node
            .node_expand_volume(proto::NodeExpandVolumeRequest {
                volume_id: id.clone(),
                volume_path: bad.clone(),
                ..Default::default()
            })
            .await;
        record(
            &format!("NodeExpand volume_path: {what}"),
            r.map(|_| ()),
            &[Code::InvalidArgument],
        );
    }

    for bad in &hostile_values {
        let what = format!("values: {:?}", &bad[..bad.len().min(40)]);
        for key in ["type", "allocation", "enforceCapacity", "fsType"] {
            let mut r = create_request("hostile-param", MIB);
            r.parameters.insert(key.to_string(), bad.clone());
            let got = c.create_volume(r).await;
            record(
                &format!("CreateVolume parameters[{key}]: {what}"),
                got.map(|_| ()),
                &[Code::InvalidArgument],
            );
        }
        let mut r = create_request("hostile-param", MIB);
        r.parameters.insert(bad.clone(), "x".into());
        let got = c.create_volume(r).await;
        record(
            &format!("CreateVolume parameter key: {what}"),
            got.map(|_| ()),
            &[Code::InvalidArgument],
        );
        let mut r = create_request("hostile-param", MIB);
        r.volume_capabilities = vec![fs_capability(bad, &[])];
        r.parameters.insert("type".into(), "loop".into());
        let got = c.create_volume(r).await;
        record(
            &format!("CreateVolume fs_type: {what}"),
            got.map(|_| ()),
            &[Code::InvalidArgument],
        );
        let mut r = create_request(bad, MIB);
        r.name = bad.clone();
        if bad.contains('\0') || bad.len() > 128 {
            let got = c.create_volume(r).await;
            record(
                &format!("CreateVolume name: {what}"),
                got.map(|_| ()),
                &[Code::InvalidArgument],
            );
        }
        let mut p = publish_request(&id, &target, false);
        p.volume_context = HashMap::from([(bad.clone(), bad.clone())]);
        p.secrets = HashMap::from([(bad.clone(), bad.clone())]);
        // Context and secrets are opaque to this driver: whatever the answer, they must not
        // reach a path (checked by the tree comparison below); unpublish if it mounted.
        let got = node.node_publish_volume(p).await;
        if got.is_ok() {
            node.node_unpublish_volume(proto::NodeUnpublishVolumeRequest {
                volume_id: id.clone(),
                target_path: target.clone(),
            })
            .await
            .unwrap();
            std::fs::create_dir_all(Path::new(&target).parent().unwrap()).unwrap();
        }
    }

    // Mount option injection: options that would change what is mounted, or smuggle more
    // options through a comma, are refused before anything is mounted.
    for flags in [
        &["rbind"][..],
        &["remount"],
        &["ro,exec"],
        &["nosuid,dev"],
        &["source=/etc"],
        &["x-mount.mkdir"],
        &["loop"],
        &["context=\"system_u:object_r:etc_t\""],
        &["uid=0,gid=0"],
        &["../../etc"],
        &["noexec\0,exec"],
    ] {
        let mut p = publish_request(&id, &target, false);
        p.volume_capability = Some(fs_capability("", flags));
        let got = node.node_publish_volume(p).await;
        record(
            &format!("NodePublish mount_flags: {flags:?}"),
            got.map(|_| ()),
            &[Code::InvalidArgument],
        );
        let mut r = create_request("hostile-flags", MIB);
        r.volume_capabilities = vec![fs_capability("", flags)];
        let got = c.create_volume(r).await;
        record(
            &format!("CreateVolume mount_flags: {flags:?}"),
            got.map(|_| ()),
            &[Code::InvalidArgument],
        );
    }

    assert_eq!(
        mounts_under(d.dir.path()),
        mounts_before,
        "the mount table changed"
    );
    let after = tree(d.dir.path());
    let added: Vec<_> = after.difference(&before).collect();
    let removed: Vec<_> = before.difference(&after).collect();
    assert!(
        added.is_empty() && removed.is_empty(),
        "hostile input changed the disk: added {added:?}, removed {removed:?}"
    );
    assert!(!Path::new("/escape").exists());
    let ids: Vec<String> = c
        .list_volumes(proto::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.volume.unwrap().volume_id)
        .collect();
    assert_eq!(ids, vec![id]);
    eprintln!("codes per field: {codes:#?}");
}

/// A request larger than the server accepts is refused with an error, nothing is created, and
/// the server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_grpc_messages_are_refused() {
    let d = Driver::start();
    let mut c = d.controller().await;
    for mib in [5usize, 16, 64] {
        let mut r = create_request("huge", MIB);
        r.parameters.insert("type".into(), "d".repeat(mib << 20));
        let status = c.create_volume(r).await.unwrap_err();
        assert_ne!(status.code(), Code::Ok);
        assert!(
            status.message().len() < 4096,
            "the error echoes the request: {} bytes",
            status.message().len()
        );
    }
    let listed = c
        .list_volumes(proto::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.entries.is_empty());
    create_id(&mut c, "after").await;
}

/// 10,000 volumes paged through ListVolumes (small and large pages) while other volumes are
/// created and deleted concurrently: every volume that exists throughout is seen exactly once
/// per pass, and no ID appears twice in a pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_volumes_page_correctly_under_concurrent_churn() {
    let count = env_u64("K8SCSI_HOSTILE_VOLUMES").unwrap_or(10_000) as usize;
    let d = Driver::start();
    let channel = d.channel().await;
    let concurrency = 16;
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let mut c = ControllerClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in (t..count).step_by(concurrency) {
                ids.push(create_id(&mut c, &format!("stable-{i}")).await);
            }
            ids
        }));
    }
    let mut stable = BTreeSet::new();
    for t in tasks {
        stable.extend(t.await.unwrap());
    }
    assert_eq!(stable.len(), count);

    let stop = Arc::new(AtomicBool::new(false));
    let mut churners = Vec::new();
    for t in 0..4 {
        let mut c = ControllerClient::new(channel.clone());
        let stop = stop.clone();
        churners.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let id = create_id(&mut c, &format!("churn-{t}-{n}")).await;
                if !n.is_multiple_of(3) {
                    c.delete_volume(proto::DeleteVolumeRequest {
                        volume_id: id,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                }
                n += 1;
            }
            n
        }));
    }
    let mut c = ControllerClient::new(channel.clone());
    for page in [1000, 97, 0] {
        let mut seen: BTreeMap<String, u32> = BTreeMap::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let got = c
                .list_volumes(proto::ListVolumesRequest {
                    max_entries: page,
                    starting_token: token.clone(),
                })
                .await
                .unwrap_or_else(|e| panic!("page {pages} of size {page}: {e:?}"))
                .into_inner();
            pages += 1;
            if page > 0 {
                assert!(got.entries.len() <= page as usize);
            }
            for e in got.entries {
                *seen.entry(e.volume.unwrap().volume_id).or_default() += 1;
            }
            if got.next_token.is_empty() {
                break;
            }
            token = got.next_token;
            // Give the churners room between pages.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "page size {page}: listed twice: {twice:?}"
        );
        let missing: Vec<_> = stable.iter().filter(|id| !seen.contains_key(*id)).collect();
        assert!(
            missing.is_empty(),
            "page size {page}: {} stable volumes missing, e.g. {:?}",
            missing.len(),
            missing.first()
        );
        eprintln!(
            "page size {page}: {pages} pages, {} volumes seen ({} stable)",
            seen.len(),
            stable.len()
        );
    }
    stop.store(true, Ordering::SeqCst);
    let mut churned = 0;
    for t in churners {
        churned += t.await.unwrap();
    }
    eprintln!("{churned} churn volumes created during the listing");
}
