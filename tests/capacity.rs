//! Capacity enforcement for real: a btrfs filesystem on a loop device as the data directory,
//! volumes as subvolumes with qgroup limits, writes past the size failing inside the published
//! volume, and online expansion visible without unmounting. Needs root and btrfs-progs (CI has
//! both); skips with a printed reason otherwise.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;

use common::{Driver, create_request, publish_request};
use k8scsi::csi::proto;
use tonic::Code;

const MIB: i64 = 1 << 20;

fn tool_available(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok()
}

/// Formats a 512 MiB btrfs image in `data`'s parent and mounts it at `data`.
fn mount_btrfs(data: &Path) {
    common::mount_image(data, 512, &["mkfs.btrfs", "-q"]);
}

fn skip_reason() -> Option<&'static str> {
    if !common::is_root() {
        return Some("needs root (loop devices, mounts)");
    }
    if !tool_available("mkfs.btrfs") || !tool_available("btrfs") {
        return Some("btrfs-progs is not installed (scripts/install-test-tools.sh installs it)");
    }
    None
}

/// Writes `bytes` of data to `path`, syncing, and returns the first error.
fn write_bytes(path: &Path, bytes: usize) -> std::io::Result<()> {
    let mut file = std::fs::File::create(path)?;
    let chunk = vec![0x5au8; 1 << 20];
    let mut written = 0;
    while written < bytes {
        file.write_all(&chunk)?;
        written += chunk.len();
    }
    file.sync_all()
}

fn is_quota_error(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(122) | Some(28)) // EDQUOT, ENOSPC
}

#[tokio::test]
async fn btrfs_volumes_enforce_their_size_and_grow_online() {
    skip_unless_ready!(skip_reason());
    let d = Driver::start_on(mount_btrfs);
    let mut c = d.controller().await;
    let mut n = d.node().await;

    // No enforceCapacity parameter: enforcement is required, and btrfs provides it.
    let mut request = create_request("pvc-quota", 16 * MIB);
    request.parameters.clear();
    let volume = common::create_ok(&mut c, request).await;
    assert_eq!(
        volume
            .volume_context
            .get("k8scsi.io/capacity-enforcement")
            .map(String::as_str),
        Some("btrfs-qgroup")
    );
    let target = d.target("pod-a");
    n.node_publish_volume(publish_request(&volume.volume_id, &target, false))
        .await
        .unwrap();

    // Within the size: fine. Past it: EDQUOT (or ENOSPC), inside the published volume.
    write_bytes(&Path::new(&target).join("small"), 8 << 20).unwrap();
    let err = write_bytes(&Path::new(&target).join("big"), 32 << 20).unwrap_err();
    assert!(is_quota_error(&err), "expected EDQUOT/ENOSPC, got {err:?}");
    std::fs::remove_file(Path::new(&target).join("big")).unwrap();

    // Stats report the qgroup's numbers against the requested size.
    let stats = n
        .node_get_volume_stats(proto::NodeGetVolumeStatsRequest {
            volume_id: volume.volume_id.clone(),
            volume_path: target.clone(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let bytes = stats
        .usage
        .iter()
        .find(|u| u.unit == proto::volume_usage::Unit::Bytes as i32)
        .unwrap();
    assert_eq!(bytes.total, 16 * MIB);
    assert!(bytes.used >= 8 * MIB, "{bytes:?}");

    // Online expansion: the bigger limit applies to the mounted volume at once.
    let expanded = c
        .controller_expand_volume(proto::ControllerExpandVolumeRequest {
            volume_id: volume.volume_id.clone(),
            capacity_range: Some(proto::CapacityRange {
                required_bytes: 64 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(expanded.capacity_bytes, 64 * MIB);
    assert!(!expanded.node_expansion_required);
    write_bytes(&Path::new(&target).join("bigger"), 32 << 20).unwrap();

    // A smaller size is already there: OK with the size the volume has (the spec's SHOULD);
    // a limit below that size would need a shrink, which is refused.
    let smaller = c
        .controller_expand_volume(proto::ControllerExpandVolumeRequest {
            volume_id: volume.volume_id.clone(),
            capacity_range: Some(proto::CapacityRange {
                required_bytes: 8 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(smaller.capacity_bytes, 64 * MIB);
    let shrink = c
        .controller_expand_volume(proto::ControllerExpandVolumeRequest {
            volume_id: volume.volume_id.clone(),
            capacity_range: Some(proto::CapacityRange {
                required_bytes: 8 * MIB,
                limit_bytes: 16 * MIB,
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(shrink.code(), Code::OutOfRange, "{shrink:?}");
    write_bytes(&Path::new(&target).join("still-room"), 8 << 20).unwrap();

    // Delete removes the subvolume.
    n.node_unpublish_volume(proto::NodeUnpublishVolumeRequest {
        volume_id: volume.volume_id.clone(),
        target_path: target.clone(),
    })
    .await
    .unwrap();
    c.delete_volume(proto::DeleteVolumeRequest {
        volume_id: volume.volume_id.clone(),
        secrets: Default::default(),
    })
    .await
    .unwrap();
    assert!(
        !d.data_dir()
            .join("volumes")
            .join(&volume.volume_id)
            .exists()
    );
}

#[tokio::test]
async fn unenforceable_sizes_fail_with_a_clear_error() {
    let d = Driver::start();
    if k8scsi::backend::btrfs::is_btrfs(&d.data_dir()) {
        eprintln!("SKIPPED: the temp dir is on btrfs, where sizes are enforceable");
        return;
    }
    let mut c = d.controller().await;
    let mut request = create_request("pvc-strict", 16 * MIB);
    request.parameters.clear();
    let status = c.create_volume(request).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("enforceCapacity"), "{status:?}");
    assert!(
        std::fs::read_dir(d.data_dir().join("volumes"))
            .unwrap()
            .next()
            .is_none()
    );

    // Opting out works, and the volume says it is unenforced.
    let volume = common::create_ok(&mut c, create_request("pvc-relaxed", 16 * MIB)).await;
    assert_eq!(
        volume
            .volume_context
            .get("k8scsi.io/capacity-enforcement")
            .map(String::as_str),
        Some("none")
    );
    let got = c
        .controller_get_volume(proto::ControllerGetVolumeRequest {
            volume_id: volume.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        got.volume.unwrap().volume_context["k8scsi.io/capacity-enforcement"],
        "none"
    );
    // Capacity tracking: this node offers nothing to classes that require enforcement.
    let strict = c
        .get_capacity(proto::GetCapacityRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(strict.available_capacity, 0, "{strict:?}");
    let relaxed = c
        .get_capacity(proto::GetCapacityRequest {
            parameters: common::unenforced(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(relaxed.available_capacity > 0, "{relaxed:?}");

    // A bad value of the parameter is refused by name.
    let mut bad = create_request("pvc-bad", MIB);
    bad.parameters
        .insert("enforceCapacity".into(), "maybe".into());
    let status = c.create_volume(bad).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("enforceCapacity"));
}

/// Mounts a fresh XFS image with project quotas at `data`, or says why it cannot.
fn mount_xfs_prjquota(data: &Path) -> Result<(), String> {
    let image = data.parent().unwrap().join("xfs.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(320 << 20)
        .unwrap();
    let mkfs = Command::new("mkfs.xfs").arg("-q").arg(&image).output();
    match mkfs {
        Ok(out) if out.status.success() => {}
        other => return Err(format!("mkfs.xfs failed: {other:?}")),
    }
    let mount = Command::new("mount")
        .args(["-o", "loop,prjquota"])
        .arg(&image)
        .arg(data)
        .output()
        .unwrap();
    if !mount.status.success() {
        return Err(format!(
            "this kernel cannot mount XFS with project quotas: {}",
            String::from_utf8_lossy(&mount.stderr).trim()
        ));
    }
    Ok(())
}

#[tokio::test]
async fn xfs_project_quotas_enforce_the_size() {
    if !common::is_root() || !tool_available("xfs_quota") {
        eprintln!("SKIPPED: needs root and xfsprogs");
        return;
    }
    // Probe first: on kernels without quota support this is not testable at all.
    let probe = tempfile::tempdir().unwrap();
    std::fs::create_dir(probe.path().join("data")).unwrap();
    if let Err(reason) = mount_xfs_prjquota(&probe.path().join("data")) {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    let _ = Command::new("umount")
        .arg(probe.path().join("data"))
        .output();

    let d = Driver::start_on(|data| mount_xfs_prjquota(data).unwrap());
    let mut c = d.controller().await;
    let mut n = d.node().await;
    let mut request = create_request("pvc-prj", 16 * MIB);
    request.parameters.clear();
    let volume = common::create_ok(&mut c, request).await;
    assert_eq!(
        volume.volume_context["k8scsi.io/capacity-enforcement"],
        "project-quota"
    );
    let target = d.target("pod-prj");
    n.node_publish_volume(publish_request(&volume.volume_id, &target, false))
        .await
        .unwrap();
    let err = write_bytes(&Path::new(&target).join("big"), 32 << 20).unwrap_err();
    assert!(is_quota_error(&err), "expected EDQUOT/ENOSPC, got {err:?}");
}

/// A CreateVolume on btrfs whose qgroup limit cannot be set (here: quotas were disabled behind
/// the driver's back) used to leave its new subvolume behind with no record.
#[tokio::test]
async fn a_btrfs_create_whose_limit_fails_leaves_no_subvolume() {
    skip_unless_ready!(skip_reason());
    let d = Driver::start_on(mount_btrfs);
    let mut c = d.controller().await;
    let disable = Command::new("btrfs")
        .args(["quota", "disable"])
        .arg(d.data_dir())
        .output()
        .unwrap();
    assert!(disable.status.success(), "{disable:?}");
    let mut request = create_request("pvc-no-limit", 16 * MIB);
    request.parameters.clear();
    let failed = c.create_volume(request).await;
    assert!(failed.is_err(), "{failed:?}");
    let left: Vec<_> = std::fs::read_dir(d.data_dir().join("volumes"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// `btrfs quota disable` (an operator's, or a tool's) drops every qgroup limit, and turning
/// quota on again brings none back: the volumes' sizes went unenforced without a word. The
/// server's start, which enables quota, now also sets each recorded limit that is gone, logs
/// it and counts it; writes past the size fail again.
#[tokio::test]
async fn size_limits_lost_to_a_quota_disable_are_set_again_at_start() {
    skip_unless_ready!(skip_reason());
    let mut d = Driver::start_on(mount_btrfs);
    let mut c = d.controller().await;
    let mut request = create_request("pvc-requota", 16 * MIB);
    request.parameters.clear();
    let volume = common::create_ok(&mut c, request).await;
    let dir = d.data_dir().join("volumes").join(&volume.volume_id);
    d.stop();

    let disabled = Command::new("btrfs")
        .args(["quota", "disable"])
        .arg(d.data_dir())
        .output()
        .unwrap();
    assert!(disabled.status.success(), "{disabled:?}");
    d.restart();
    let err = write_bytes(&dir.join("big"), 32 << 20).unwrap_err();
    assert!(is_quota_error(&err), "expected EDQUOT/ENOSPC, got {err:?}");
    assert!(
        d.log().contains("size limit was gone"),
        "not reported: {}",
        d.log()
    );
}
