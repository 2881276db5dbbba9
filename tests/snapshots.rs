//! Snapshots and clones for real, one test per mechanism, each on its own filesystem image:
//! - btrfs data directory: directory volumes are subvolumes, snapshots read-only subvolume
//!   snapshots, restores and clones writable snapshots;
//! - XFS with `reflink=1`: loop volumes' images reflinked while their mounted filesystem is
//!   frozen, restored into a larger volume whose filesystem grows at staging;
//! - ext4 (no reflink): the full copy, which must keep holes, hard links, symlinks, xattrs,
//!   owners, modes and timestamps.
//!
//! Every test writes data, snapshots, writes more *after* CreateSnapshot answered, and checks
//! by checksum that a volume restored from the snapshot holds exactly the data before the
//! snapshot, while a clone holds the data at clone time. Needs root and the filesystem tools;
//! skips with a printed reason otherwise (fails under `K8SCSI_REQUIRE_TOOLS=1`).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Driver, create_request, mount_image};
use k8scsi::client::mount_capability;
use k8scsi::csi::proto::volume_capability::AccessType;
use k8scsi::csi::proto::volume_capability::access_mode::Mode;
use k8scsi::csi::proto::volume_content_source::{SnapshotSource, Type, VolumeSource};
use k8scsi::csi::proto::{self, VolumeCapability, VolumeContentSource};
use proto::controller_client::ControllerClient;
use sha2::{Digest, Sha256};
use tonic::Code;
use tonic::transport::Channel;

const MIB: i64 = 1 << 20;

fn tool_missing(tools: &[&str]) -> Option<String> {
    if !common::is_root() {
        return Some("needs root (loop devices, mounts)".into());
    }
    tools
        .iter()
        .find(|t| Command::new(t).arg("-V").output().is_err())
        .map(|t| format!("{t} is not installed (scripts/install-test-tools.sh installs it)"))
}

fn snap_source(id: &str) -> VolumeContentSource {
    VolumeContentSource {
        r#type: Some(Type::Snapshot(SnapshotSource {
            snapshot_id: id.to_string(),
        })),
    }
}

fn volume_source(id: &str) -> VolumeContentSource {
    VolumeContentSource {
        r#type: Some(Type::Volume(VolumeSource {
            volume_id: id.to_string(),
        })),
    }
}

/// CreateSnapshot, then (for a copy that runs in the background) GetSnapshot until ready.
async fn snapshot(c: &mut ControllerClient<Channel>, name: &str, source: &str) -> proto::Snapshot {
    let snap = c
        .create_snapshot(proto::CreateSnapshotRequest {
            source_volume_id: source.to_string(),
            name: name.to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(snap.source_volume_id, source);
    let ready = wait_ready(c, &snap.snapshot_id).await;
    assert_eq!(
        ready.creation_time, snap.creation_time,
        "the point in time never moves"
    );
    ready
}

/// Polls GetSnapshot until the snapshot is ready (generous: a loaded CI machine copies
/// slowly).
async fn wait_ready(c: &mut ControllerClient<Channel>, id: &str) -> proto::Snapshot {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    loop {
        let snap = c
            .get_snapshot(proto::GetSnapshotRequest {
                snapshot_id: id.to_string(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap();
        if snap.ready_to_use {
            return snap;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "snapshot {id} not ready after 300 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

async fn create(
    c: &mut ControllerClient<Channel>,
    mut request: proto::CreateVolumeRequest,
    source: Option<VolumeContentSource>,
) -> Result<proto::Volume, tonic::Status> {
    request.volume_content_source = source.clone();
    let volume = c.create_volume(request).await?.into_inner().volume.unwrap();
    assert_eq!(volume.content_source, source, "content source echoed");
    Ok(volume)
}

/// A driver whose data directory is a fresh ext4 image of `image_mib` (no reflink: snapshots
/// are full copies), a 300 MiB directory volume `name` on it, and that volume's directory.
async fn volume_on_ext4_image(
    image_mib: u64,
    name: &str,
) -> (Driver, ControllerClient<Channel>, proto::Volume, PathBuf) {
    let d = Driver::start_on(|data| mount_image(data, image_mib, &["mkfs.ext4", "-q"]));
    let mut c = d.controller().await;
    let volume = create(&mut c, create_request(name, 300 * MIB), None)
        .await
        .unwrap();
    let dir = dir_volume(&d, &volume.volume_id);
    (d, c, volume, dir)
}

/// SHA-256 of every regular file under `root`, by relative path.
fn checksums(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let meta = std::fs::symlink_metadata(entry.path()).unwrap();
            if meta.is_dir() {
                if entry.file_name() != "lost+found" {
                    pending.push(entry.path());
                }
            } else if meta.is_file() {
                let digest = Sha256::digest(std::fs::read(entry.path()).unwrap());
                let rel = entry.path().strip_prefix(root).unwrap().to_path_buf();
                out.insert(rel, format!("{digest:x}"));
            }
        }
    }
    out
}

/// Pseudo-random bytes (a fixed LCG), so every file has distinct content.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) as u8
        })
        .collect()
}

/// Whether the server logged a snapshot or population of `kind` (`btrfs-snapshot`, `reflink`,
/// `copy`).
fn logged_mechanism(d: &Driver, kind: &str) -> bool {
    d.log().lines().any(|l| {
        (l.contains("snapshot taken") || l.contains("volume populated"))
            && (l.contains(&format!("mechanism=\"{kind}\""))
                || l.contains(&format!("mechanism={kind} ")))
    })
}

fn dir_volume(d: &Driver, id: &str) -> PathBuf {
    d.data_dir().join("volumes").join(id)
}

#[tokio::test]
async fn btrfs_directory_volumes_snapshot_as_subvolumes() {
    skip_unless_ready!(tool_missing(&["mkfs.btrfs", "btrfs"]));
    let d = Driver::start_on(|data| mount_image(data, 512, &["mkfs.btrfs", "-q"]));
    let mut c = d.controller().await;

    // Enforced (btrfs qgroup) volume.
    let mut request = create_request("pvc-src", 32 * MIB);
    request.parameters.clear();
    let source = create(&mut c, request, None).await.unwrap();
    let src_dir = dir_volume(&d, &source.volume_id);
    std::fs::create_dir(src_dir.join("sub")).unwrap();
    std::fs::write(src_dir.join("a"), noise(1, 3 << 20)).unwrap();
    std::fs::write(src_dir.join("sub/b"), noise(2, 100_000)).unwrap();
    let before = checksums(&src_dir);

    let snap = snapshot(&mut c, "snap-1", &source.volume_id).await;
    assert_eq!(snap.size_bytes, 32 * MIB);
    // Writes after CreateSnapshot answered must not reach the snapshot.
    std::fs::write(src_dir.join("a"), noise(3, 3 << 20)).unwrap();
    std::fs::write(src_dir.join("later"), b"after the snapshot").unwrap();
    let after = checksums(&src_dir);
    assert_ne!(before, after);

    // Restore into a larger volume: same content, the larger limit.
    let mut request = create_request("pvc-restored", 64 * MIB);
    request.parameters.clear();
    let restored = create(
        &mut c,
        request.clone(),
        Some(snap_source(&snap.snapshot_id)),
    )
    .await
    .unwrap();
    assert_eq!(restored.capacity_bytes, 64 * MIB);
    assert_eq!(checksums(&dir_volume(&d, &restored.volume_id)), before);
    // Idempotent repeat; a different source under the same name is ALREADY_EXISTS.
    create(
        &mut c,
        request.clone(),
        Some(snap_source(&snap.snapshot_id)),
    )
    .await
    .unwrap();
    let status = create(&mut c, request, Some(volume_source(&source.volume_id)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");

    // A clone holds the data as of the clone.
    let mut request = create_request("pvc-clone", 32 * MIB);
    request.parameters.clear();
    let clone = create(&mut c, request, Some(volume_source(&source.volume_id)))
        .await
        .unwrap();
    assert_eq!(checksums(&dir_volume(&d, &clone.volume_id)), after);

    // Restored volumes are independent of the snapshot and of each other.
    std::fs::write(dir_volume(&d, &restored.volume_id).join("mine"), b"x").unwrap();
    assert!(!dir_volume(&d, &clone.volume_id).join("mine").exists());

    // A smaller volume than the snapshot is OUT_OF_RANGE.
    let mut small = create_request("pvc-small", 16 * MIB);
    small.capacity_range.as_mut().unwrap().limit_bytes = 16 * MIB;
    small.parameters.clear();
    let status = create(&mut c, small, Some(snap_source(&snap.snapshot_id)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");

    // The source volume can go; its snapshot stays usable.
    c.delete_volume(proto::DeleteVolumeRequest {
        volume_id: source.volume_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut request = create_request("pvc-restored-2", 32 * MIB);
    request.parameters.clear();
    let again = create(&mut c, request, Some(snap_source(&snap.snapshot_id)))
        .await
        .unwrap();
    assert_eq!(checksums(&dir_volume(&d, &again.volume_id)), before);
    assert!(logged_mechanism(&d, "btrfs-snapshot"), "{}", d.log());

    c.delete_snapshot(proto::DeleteSnapshotRequest {
        snapshot_id: snap.snapshot_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let status = c
        .get_snapshot(proto::GetSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(
        !d.data_dir()
            .join("snapshots")
            .join(&snap.snapshot_id)
            .exists()
    );
    // The restored volumes do not depend on the snapshot.
    assert_eq!(checksums(&dir_volume(&d, &again.volume_id)), before);
}

fn loop_params() -> HashMap<String, String> {
    [("type".to_string(), "loop".to_string())].into()
}

fn fs_capability(fs_type: &str) -> VolumeCapability {
    let mut cap = mount_capability(Mode::SingleNodeWriter, vec![]);
    if let Some(AccessType::Mount(m)) = cap.access_type.as_mut() {
        m.fs_type = fs_type.to_string();
    }
    cap
}

fn loop_request(name: &str, bytes: i64, fs_type: &str) -> proto::CreateVolumeRequest {
    proto::CreateVolumeRequest {
        name: name.to_string(),
        capacity_range: Some(proto::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![fs_capability(fs_type)],
        parameters: loop_params(),
        ..Default::default()
    }
}

async fn stage(d: &Driver, volume_id: &str, fs_type: &str, pod: &str) -> PathBuf {
    let staging = d.target(pod);
    d.node()
        .await
        .node_stage_volume(proto::NodeStageVolumeRequest {
            volume_id: volume_id.to_string(),
            staging_target_path: staging.clone(),
            volume_capability: Some(fs_capability(fs_type)),
            ..Default::default()
        })
        .await
        .unwrap();
    PathBuf::from(staging)
}

async fn unstage(d: &Driver, volume_id: &str, staging: &Path) {
    d.node()
        .await
        .node_unstage_volume(proto::NodeUnstageVolumeRequest {
            volume_id: volume_id.to_string(),
            staging_target_path: staging.to_string_lossy().into_owned(),
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn xfs_reflink_snapshots_of_mounted_loop_volumes() {
    skip_unless_ready!(tool_missing(&[
        "mkfs.xfs",
        "xfs_growfs",
        "losetup",
        "fsfreeze"
    ]));
    let d =
        Driver::start_on(|data| mount_image(data, 2048, &["mkfs.xfs", "-q", "-m", "reflink=1"]));
    let mut c = d.controller().await;
    let source = create(&mut c, loop_request("pvc-xfs", 320 * MIB, "xfs"), None)
        .await
        .unwrap();
    let mnt = stage(&d, &source.volume_id, "xfs", "src-staging").await;
    // Written but not synced: the freeze must flush it into the snapshot.
    std::fs::write(mnt.join("a"), noise(10, 5 << 20)).unwrap();
    std::fs::create_dir(mnt.join("dir")).unwrap();
    std::fs::write(mnt.join("dir/b"), noise(11, 12345)).unwrap();
    let before = checksums(&mnt);

    let snap = snapshot(&mut c, "snap-xfs", &source.volume_id).await;
    assert!(logged_mechanism(&d, "reflink"), "{}", d.log());
    std::fs::write(mnt.join("a"), noise(12, 5 << 20)).unwrap();
    std::fs::write(mnt.join("later"), b"after").unwrap();
    let after = checksums(&mnt);
    // The filesystem is thawed again: writes went through and sync returns.
    rustix::fs::sync();

    // Restore into a larger volume: its filesystem is grown when staged.
    let restored = create(
        &mut c,
        loop_request("pvc-xfs-restored", 400 * MIB, "xfs"),
        Some(snap_source(&snap.snapshot_id)),
    )
    .await
    .unwrap();
    assert_eq!(restored.capacity_bytes, 400 * MIB);
    let rmnt = stage(&d, &restored.volume_id, "xfs", "restored-staging").await;
    assert_eq!(checksums(&rmnt), before);
    let st = rustix::fs::statvfs(&rmnt).unwrap();
    let total = st.f_blocks * st.f_frsize;
    assert!(
        total > 330 << 20,
        "filesystem grown to its device: {total} bytes"
    );

    // A clone of the mounted source holds what it held at clone time.
    let clone = create(
        &mut c,
        loop_request("pvc-xfs-clone", 320 * MIB, "xfs"),
        Some(volume_source(&source.volume_id)),
    )
    .await
    .unwrap();
    let cmnt = stage(&d, &clone.volume_id, "xfs", "clone-staging").await;
    assert_eq!(checksums(&cmnt), after);

    // A filesystem type other than the snapshot's is refused.
    let status = create(
        &mut c,
        loop_request("pvc-ext4-from-xfs", 400 * MIB, "ext4"),
        Some(snap_source(&snap.snapshot_id)),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // Delete the source; the snapshot still restores.
    unstage(&d, &source.volume_id, &mnt).await;
    c.delete_volume(proto::DeleteVolumeRequest {
        volume_id: source.volume_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let again = create(
        &mut c,
        loop_request("pvc-xfs-again", 320 * MIB, "xfs"),
        Some(snap_source(&snap.snapshot_id)),
    )
    .await
    .unwrap();
    let amnt = stage(&d, &again.volume_id, "xfs", "again-staging").await;
    assert_eq!(checksums(&amnt), before);
    for (id, m) in [
        (&restored.volume_id, &rmnt),
        (&clone.volume_id, &cmnt),
        (&again.volume_id, &amnt),
    ] {
        unstage(&d, id, m).await;
    }
}

#[tokio::test]
async fn ext4_full_copy_keeps_holes_links_xattrs_and_metadata() {
    skip_unless_ready!(tool_missing(&["mkfs.ext4", "losetup", "fsfreeze"]));
    let d = Driver::start_on(|data| mount_image(data, 512, &["mkfs.ext4", "-q"]));
    let mut c = d.controller().await;
    let source = create(&mut c, create_request("pvc-ext4", 64 * MIB), None)
        .await
        .unwrap();
    let src = dir_volume(&d, &source.volume_id);
    // A sparse file: 1 MiB of data in the middle of 100 MiB.
    let f = std::fs::File::create(src.join("sparse")).unwrap();
    f.set_len(100 << 20).unwrap();
    std::os::unix::fs::FileExt::write_at(&f, &noise(20, 1 << 20), 50 << 20).unwrap();
    drop(f);
    std::fs::create_dir(src.join("d")).unwrap();
    std::fs::write(src.join("d/file"), noise(21, 4096)).unwrap();
    std::fs::hard_link(src.join("d/file"), src.join("hard")).unwrap();
    std::os::unix::fs::symlink("../outside", src.join("d/link")).unwrap();
    rustix::fs::setxattr(
        src.join("d/file"),
        "user.k8scsi",
        b"kept",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    std::os::unix::fs::chown(src.join("d/file"), Some(1234), Some(5678)).unwrap();
    std::fs::set_permissions(
        src.join("d/file"),
        std::os::unix::fs::PermissionsExt::from_mode(0o4750),
    )
    .unwrap();
    let old = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: 1_000_000_000,
            tv_nsec: 5,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: 1_000_000_001,
            tv_nsec: 7,
        },
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        src.join("d"),
        &old,
        rustix::fs::AtFlags::empty(),
    )
    .unwrap();
    let before = checksums(&src);

    let snap = snapshot(&mut c, "snap-ext4", &source.volume_id).await;
    std::fs::write(src.join("d/file"), b"changed").unwrap();
    std::fs::write(src.join("later"), b"after").unwrap();
    assert!(logged_mechanism(&d, "copy"), "{}", d.log());

    let restored = create(
        &mut c,
        create_request("pvc-ext4-restored", 64 * MIB),
        Some(snap_source(&snap.snapshot_id)),
    )
    .await
    .unwrap();
    let dst = dir_volume(&d, &restored.volume_id);
    assert_eq!(checksums(&dst), before);
    let sparse = std::fs::metadata(dst.join("sparse")).unwrap();
    assert_eq!(sparse.len(), 100 << 20);
    assert!(
        sparse.blocks() * 512 < 4 << 20,
        "holes kept: {} bytes allocated",
        sparse.blocks() * 512
    );
    let file = std::fs::metadata(dst.join("d/file")).unwrap();
    assert_eq!(
        file.ino(),
        std::fs::metadata(dst.join("hard")).unwrap().ino()
    );
    assert_eq!((file.uid(), file.gid()), (1234, 5678));
    assert_eq!(file.mode() & 0o7777, 0o4750);
    let mut value = [0u8; 16];
    let n = rustix::fs::getxattr(dst.join("d/file"), "user.k8scsi", &mut value[..]).unwrap();
    assert_eq!(&value[..n], b"kept");
    assert_eq!(
        std::fs::read_link(dst.join("d/link")).unwrap(),
        Path::new("../outside")
    );
    let dmeta = std::fs::metadata(dst.join("d")).unwrap();
    // (atime is not compared: reading the copy to check it updates it.)
    assert_eq!((dmeta.mtime(), dmeta.mtime_nsec()), (1_000_000_001, 7));

    // Loop images on ext4 are copied too, and stay sparse.
    let image_vol = create(&mut c, loop_request("pvc-img", 64 * MIB, "ext4"), None)
        .await
        .unwrap();
    let img_snap = snapshot(&mut c, "snap-img", &image_vol.volume_id).await;
    let copy = d
        .data_dir()
        .join("snapshots")
        .join(format!("{}.ext4", img_snap.snapshot_id));
    let meta = std::fs::metadata(&copy).unwrap();
    assert_eq!(meta.len(), 64 << 20);
    assert!(meta.blocks() * 512 < 32 << 20, "sparse image copy");
}

fn stage_request(volume_id: &str, staging: &str) -> proto::NodeStageVolumeRequest {
    proto::NodeStageVolumeRequest {
        volume_id: volume_id.to_string(),
        staging_target_path: staging.to_string(),
        volume_capability: Some(fs_capability("")),
        ..Default::default()
    }
}

/// On ext4 (no reflink) a snapshot of an unstaged volume with 256 MiB of data is a slow full
/// copy: CreateSnapshot answers at once with `ready_to_use = false` and copies in the
/// background. Whether a given call lands while the copy runs depends on the machine's speed,
/// so every check is an invariant that holds either way: a call on the source (or a restore of
/// the snapshot) either gets ABORTED or finds the snapshot complete; calls on other volumes
/// always work. Once the source is staged, snapshots are copied before the answer again.
#[tokio::test]
async fn slow_full_copies_of_unstaged_volumes_run_in_the_background() {
    skip_unless_ready!(tool_missing(&["mkfs.ext4"]));
    let (d, mut c, source, src) = volume_on_ext4_image(2048, "pvc-bg").await;
    // 256 MiB in 128 files of 2 MiB.
    for i in 0..128 {
        std::fs::write(
            src.join(format!("f{i}")),
            noise(300 + i, 64 << 10).repeat(32),
        )
        .unwrap();
    }
    let before = checksums(&src);
    let request = proto::CreateSnapshotRequest {
        source_volume_id: source.volume_id.clone(),
        name: "snap-bg".into(),
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let first = c
        .create_snapshot(request.clone())
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    let answered_in = started.elapsed();
    assert!(
        !first.ready_to_use,
        "a full copy of an unstaged volume runs in the background: {first:?}"
    );
    let id = first.snapshot_id.clone();
    let mut aborted = 0;

    // A repeat answers with the same snapshot and point in time (not ABORTED).
    let again = c
        .create_snapshot(request.clone())
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(
        (&again.snapshot_id, &again.creation_time),
        (&id, &first.creation_time)
    );
    // Listed as not ready, or complete.
    let listed = c
        .list_snapshots(proto::ListSnapshotsRequest {
            snapshot_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(listed.len(), 1);
    if listed[0].snapshot.as_ref().unwrap().ready_to_use {
        assert_eq!(checksums(&d.data_dir().join("snapshots").join(&id)), before);
    }

    // The source cannot be staged while its copy runs.
    let staging = d.target("pod-bg");
    let mut node = d.node().await;
    let mut source_staged = false;
    match node
        .node_stage_volume(stage_request(&source.volume_id, &staging))
        .await
    {
        Err(status) if status.code() == Code::Aborted => aborted += 1,
        Ok(_) => {
            source_staged = true;
            let got = wait_ready(&mut c, &id).await;
            assert!(got.ready_to_use, "staged only after the copy finished");
        }
        Err(status) => panic!("NodeStage of the source: {status:?}"),
    }
    // Restoring needs the copy done: ABORTED (the CO retries) or a complete volume.
    match create(
        &mut c,
        create_request("pvc-bg-early", 300 * MIB),
        Some(snap_source(&id)),
    )
    .await
    {
        Err(status) if status.code() == Code::Aborted => aborted += 1,
        Ok(early) => {
            assert_eq!(checksums(&dir_volume(&d, &early.volume_id)), before);
        }
        Err(status) => panic!("restore from a snapshot being copied: {status:?}"),
    }
    // Other volumes are never held up.
    let other = create(&mut c, create_request("pvc-bg-other", 8 * MIB), None)
        .await
        .unwrap();
    let other_staging = d.target("pod-bg-other");
    node.node_stage_volume(stage_request(&other.volume_id, &other_staging))
        .await
        .unwrap();
    node.node_unstage_volume(proto::NodeUnstageVolumeRequest {
        volume_id: other.volume_id.clone(),
        staging_target_path: other_staging,
    })
    .await
    .unwrap();
    c.delete_volume(proto::DeleteVolumeRequest {
        volume_id: other.volume_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();

    let ready = wait_ready(&mut c, &id).await;
    eprintln!(
        "CreateSnapshot answered in {answered_in:?}, ready after {:?}; calls ABORTED while \
         copying: {aborted}",
        started.elapsed()
    );
    assert_eq!(ready.creation_time, first.creation_time);
    assert!(logged_mechanism(&d, "copy"), "{}", d.log());
    let restored = create(
        &mut c,
        create_request("pvc-bg-restored", 300 * MIB),
        Some(snap_source(&id)),
    )
    .await
    .unwrap();
    assert_eq!(checksums(&dir_volume(&d, &restored.volume_id)), before);

    // A staged source is copied before CreateSnapshot answers.
    if !source_staged {
        node.node_stage_volume(stage_request(&source.volume_id, &staging))
            .await
            .unwrap();
    }
    let staged_snap = c
        .create_snapshot(proto::CreateSnapshotRequest {
            source_volume_id: source.volume_id.clone(),
            name: "snap-bg-staged".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(staged_snap.ready_to_use, "{staged_snap:?}");
    assert_eq!(
        checksums(
            &d.data_dir()
                .join("snapshots")
                .join(&staged_snap.snapshot_id)
        ),
        before
    );
    node.node_unstage_volume(proto::NodeUnstageVolumeRequest {
        volume_id: source.volume_id.clone(),
        staging_target_path: staging,
    })
    .await
    .unwrap();
    for snap in [&id, &staged_snap.snapshot_id] {
        c.delete_snapshot(proto::DeleteSnapshotRequest {
            snapshot_id: snap.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
}

/// DeleteSnapshot of a snapshot whose full copy still runs in the background cancels the copy
/// instead of answering ABORTED until it is done: the copy stops at its next file, removes what
/// it made and the record, and releases the source volume and the snapshot's name. SIGTERM stops
/// a copy too, but keeps its snapshot for the next start.
#[tokio::test]
async fn deleting_a_snapshot_cancels_its_background_copy() {
    skip_unless_ready!(tool_missing(&["mkfs.ext4"]));
    let (mut d, mut c, source, src) = volume_on_ext4_image(1024, "pvc-cancel").await;
    // 2,000 files of 128 KiB: copying them (a file at a time, then a syncfs of 256 MiB) takes
    // far longer than the few milliseconds between CreateSnapshot's answer and DeleteSnapshot.
    let block = noise(7, 64 << 10).repeat(2);
    for i in 0..2000 {
        std::fs::write(src.join(format!("f{i}")), &block).unwrap();
    }
    let request = proto::CreateSnapshotRequest {
        source_volume_id: source.volume_id.clone(),
        name: "snap-cancel".into(),
        ..Default::default()
    };
    let first = c
        .create_snapshot(request.clone())
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(!first.ready_to_use, "copied in the background: {first:?}");
    let id = first.snapshot_id.clone();

    let started = std::time::Instant::now();
    c.delete_snapshot(proto::DeleteSnapshotRequest {
        snapshot_id: id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let took = started.elapsed();
    eprintln!("DeleteSnapshot during the background copy answered in {took:?}");
    assert!(
        d.log()
            .contains("background snapshot copy cancelled by DeleteSnapshot"),
        "{}",
        d.log()
    );
    assert!(took < std::time::Duration::from_secs(10), "{took:?}");

    // Gone: record and storage (no partial copy left either).
    let status = c
        .get_snapshot(proto::GetSnapshotRequest {
            snapshot_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let left: Vec<_> = std::fs::read_dir(d.data_dir().join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "snapshot storage left: {left:?}");
    // The source volume is free again at once.
    let staging = d.target("pod-cancel");
    let mut node = d.node().await;
    node.node_stage_volume(stage_request(&source.volume_id, &staging))
        .await
        .unwrap();
    node.node_unstage_volume(proto::NodeUnstageVolumeRequest {
        volume_id: source.volume_id.clone(),
        staging_target_path: staging,
    })
    .await
    .unwrap();
    // The name is free: the CO's next CreateSnapshot makes a new snapshot, in the background
    // again. SIGTERM meanwhile stops the copy, keeping the snapshot: the server exits without
    // waiting for the copy, and the next start copies it again.
    let again = c
        .create_snapshot(request)
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(again.snapshot_id, id, "IDs derive from names");
    assert!(!again.ready_to_use, "{again:?}");
    drop((c, node));
    let stopping = std::time::Instant::now();
    let status = d.stop();
    eprintln!(
        "SIGTERM during a background copy: exited in {:?}",
        stopping.elapsed()
    );
    assert!(status.success(), "{status}: {}", d.log());
    assert!(
        d.log()
            .contains("background snapshot copy stopped for shutdown"),
        "{}",
        d.log()
    );
    let restarted = std::time::Instant::now();
    d.restart();
    let mut c = d.controller().await;
    let ready = wait_ready(&mut c, &id).await;
    eprintln!(
        "copied again after the restart, ready in {:?}",
        restarted.elapsed()
    );
    let seconds = |s: &proto::Snapshot| {
        let t = s.creation_time.as_ref().unwrap();
        (t.seconds, t.nanos)
    };
    assert!(
        seconds(&ready) > seconds(&first),
        "a new point in time: {ready:?}"
    );
    assert_eq!(
        checksums(&d.data_dir().join("snapshots").join(&id)),
        checksums(&src)
    );
    // A delete once the copy is done has nothing to cancel.
    c.delete_snapshot(proto::DeleteSnapshotRequest {
        snapshot_id: id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        d.log()
            .matches("background snapshot copy cancelled")
            .count(),
        1
    );
}

#[tokio::test]
async fn interrupted_snapshots_are_removed_at_restart_and_errors_follow_the_spec() {
    let mut d = Driver::start();
    let mut c = d.controller().await;
    let volume = create(&mut c, create_request("pvc-r", 8 * MIB), None)
        .await
        .unwrap();
    std::fs::write(dir_volume(&d, &volume.volume_id).join("f"), b"data").unwrap();
    let snap = snapshot(&mut c, "snap-r", &volume.volume_id).await;
    // Same name, other source: ALREADY_EXISTS; unknown source: NOT_FOUND.
    let other = create(&mut c, create_request("pvc-r2", 8 * MIB), None)
        .await
        .unwrap();
    let status = c
        .create_snapshot(proto::CreateSnapshotRequest {
            source_volume_id: other.volume_id.clone(),
            name: "snap-r".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    let status = c
        .create_snapshot(proto::CreateSnapshotRequest {
            source_volume_id: "dir-00000000000000000000000000000000".into(),
            name: "snap-x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let status = c
        .create_snapshot(proto::CreateSnapshotRequest {
            source_volume_id: volume.volume_id.clone(),
            name: "snap-p".into(),
            parameters: [("bogus".to_string(), "1".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // Hostile IDs are refused or unknown, never paths.
    for bad in ["../../etc", "snap-dir-../../../../../etc/passwd"] {
        c.delete_snapshot(proto::DeleteSnapshotRequest {
            snapshot_id: bad.into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let status = create(
            &mut c,
            create_request("pvc-bad", 8 * MIB),
            Some(snap_source(bad)),
        )
        .await
        .unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }
    let listed = c
        .list_snapshots(proto::ListSnapshotsRequest {
            snapshot_id: "snap-dir-00000000000000000000000000000000".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.entries.is_empty());

    // Leftovers of a crash: a partial copy and complete storage whose record never committed.
    let snaps = d.data_dir().join("snapshots");
    let partial = snaps.join("snap-dir-0123456789abcdef0123456789abcdef.partial");
    let unrecorded = snaps.join("snap-dir-fedcba9876543210fedcba9876543210");
    std::fs::create_dir_all(partial.join("x")).unwrap();
    std::fs::create_dir_all(&unrecorded).unwrap();
    d.restart();
    assert!(!partial.exists(), "partial copy removed");
    assert!(!unrecorded.exists(), "unrecorded snapshot removed");
    assert!(snaps.join(&snap.snapshot_id).join("f").exists());
    let mut c = d.controller().await;
    let got = c
        .get_snapshot(proto::GetSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(got.snapshot_id, snap.snapshot_id);
    assert!(got.ready_to_use);
    assert_eq!(got.creation_time, snap.creation_time);
}

#[tokio::test]
async fn group_snapshots_capture_every_member_at_one_point() {
    skip_unless_ready!(tool_missing(&["mkfs.ext4", "losetup", "fsfreeze"]));
    let d = Driver::start();
    let mut c = d.controller().await;
    let mut g = proto::group_controller_client::GroupControllerClient::new(d.channel().await);
    let a = create(&mut c, loop_request("pvc-ga", 16 * MIB, "ext4"), None)
        .await
        .unwrap();
    let b = create(&mut c, loop_request("pvc-gb", 16 * MIB, "ext4"), None)
        .await
        .unwrap();
    let ma = stage(&d, &a.volume_id, "ext4", "ga-staging").await;
    let mb = stage(&d, &b.volume_id, "ext4", "gb-staging").await;
    std::fs::write(ma.join("a"), noise(30, 1 << 20)).unwrap();
    std::fs::write(mb.join("b"), noise(31, 1 << 20)).unwrap();
    let (before_a, before_b) = (checksums(&ma), checksums(&mb));

    let request = proto::CreateVolumeGroupSnapshotRequest {
        name: "group-1".into(),
        source_volume_ids: vec![a.volume_id.clone(), b.volume_id.clone()],
        ..Default::default()
    };
    let group = g
        .create_volume_group_snapshot(request.clone())
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    assert!(group.ready_to_use);
    assert_eq!(group.snapshots.len(), 2);
    std::fs::write(ma.join("a"), b"later").unwrap();
    std::fs::write(mb.join("later"), b"later").unwrap();
    for s in &group.snapshots {
        assert_eq!(s.group_snapshot_id, group.group_snapshot_id);
        assert!(s.ready_to_use);
    }
    // Idempotent; another member set under the same name is ALREADY_EXISTS.
    let again = g
        .create_volume_group_snapshot(request.clone())
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    assert_eq!(again.group_snapshot_id, group.group_snapshot_id);
    let mut other = request.clone();
    other.source_volume_ids.pop();
    let status = g.create_volume_group_snapshot(other).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");

    // Each member restores to the data it held before the group snapshot.
    for (i, s) in group.snapshots.iter().enumerate() {
        let restored = create(
            &mut c,
            loop_request(&format!("pvc-g-restored-{i}"), 16 * MIB, "ext4"),
            Some(snap_source(&s.snapshot_id)),
        )
        .await
        .unwrap();
        let m = stage(&d, &restored.volume_id, "ext4", &format!("g-restored-{i}")).await;
        let expected = if s.source_volume_id == a.volume_id {
            &before_a
        } else {
            &before_b
        };
        assert_eq!(&checksums(&m), expected);
        unstage(&d, &restored.volume_id, &m).await;
    }

    // Members go with their group only.
    let status = c
        .delete_snapshot(proto::DeleteSnapshotRequest {
            snapshot_id: group.snapshots[0].snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let status = g
        .get_volume_group_snapshot(proto::GetVolumeGroupSnapshotRequest {
            group_snapshot_id: group.group_snapshot_id.clone(),
            snapshot_ids: vec![group.snapshots[0].snapshot_id.clone()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // Directory volumes cannot be frozen: refused.
    let dir = create(&mut c, create_request("pvc-gdir", 8 * MIB), None)
        .await
        .unwrap();
    let status = g
        .create_volume_group_snapshot(proto::CreateVolumeGroupSnapshotRequest {
            name: "group-dir".into(),
            source_volume_ids: vec![dir.volume_id.clone(), a.volume_id.clone()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // Writes still go through: every filesystem was thawed.
    std::fs::write(ma.join("after-refusal"), b"x").unwrap();
    rustix::fs::sync();

    g.delete_volume_group_snapshot(proto::DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: group.group_snapshot_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let status = g
        .get_volume_group_snapshot(proto::GetVolumeGroupSnapshotRequest {
            group_snapshot_id: group.group_snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    for s in &group.snapshots {
        assert!(
            !d.data_dir()
                .join("snapshots")
                .join(format!("{}.ext4", s.snapshot_id))
                .exists()
        );
    }
    unstage(&d, &a.volume_id, &ma).await;
    unstage(&d, &b.volume_id, &mb).await;
}

#[tokio::test]
async fn client_snapshot_commands() {
    let d = Driver::start();
    let client = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_k8scsi"))
            .arg("client")
            .arg("--endpoint")
            .arg(format!("unix://{}", d.socket().display()))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let created = client(&[
        "create-volume",
        "pvc-cli",
        "--size",
        "8Mi",
        "--param",
        "enforceCapacity=false",
    ]);
    let volume = created.split('\t').next().unwrap().to_string();
    std::fs::write(dir_volume(&d, &volume).join("f"), b"cli").unwrap();
    let snap = client(&["snapshot", "create", "snap-cli", &volume]);
    let snap_id = snap.split('\t').next().unwrap().to_string();
    assert!(snap_id.starts_with("snap-dir-"), "{snap}");
    assert!(
        snap.contains(&volume) && snap.contains("ready=true"),
        "{snap}"
    );
    assert_eq!(client(&["snapshot", "list", "--source", &volume]), snap);
    assert_eq!(client(&["snapshot", "get", &snap_id]), snap);
    let restored = client(&[
        "create-volume",
        "pvc-cli-restored",
        "--size",
        "16Mi",
        "--param",
        "enforceCapacity=false",
        "--from-snapshot",
        &snap_id,
    ]);
    let restored = restored.split('\t').next().unwrap().to_string();
    assert_eq!(
        std::fs::read(dir_volume(&d, &restored).join("f")).unwrap(),
        b"cli"
    );
    client(&["snapshot", "delete", &snap_id]);
    assert_eq!(client(&["snapshot", "list"]), "");
}

#[tokio::test]
async fn a_snapshot_killed_mid_copy_is_never_reported_ready_while_partial() {
    let mut d = Driver::start();
    let mut c = d.controller().await;
    let volume = create(&mut c, create_request("pvc-kill", 512 * MIB), None)
        .await
        .unwrap();
    let src = dir_volume(&d, &volume.volume_id);
    // 128 MiB in 64 files, enough for the copy to take a while.
    for i in 0..64 {
        std::fs::write(
            src.join(format!("f{i}")),
            noise(100 + i, 64 << 10).repeat(32),
        )
        .unwrap();
    }
    let before = checksums(&src);
    let snaps = d.data_dir().join("snapshots");
    let partial_exists = || {
        std::fs::read_dir(&snaps)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".partial"))
    };
    let request = proto::CreateSnapshotRequest {
        source_volume_id: volume.volume_id.clone(),
        name: "snap-kill".into(),
        ..Default::default()
    };
    let final_exists = || {
        std::fs::read_dir(&snaps).unwrap().flatten().any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("snap-") && !name.ends_with(".partial")
        })
    };
    let mut racing = c.clone();
    let racing_request = request.clone();
    let call = tokio::spawn(async move { racing.create_snapshot(racing_request).await });
    // Kill the server while the copy is under way (or, on a fast machine, just after it). On a
    // data directory without reflinks the copy runs after CreateSnapshot answered (not
    // ready); with reflinks or btrfs it is done before the answer.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !partial_exists() && !final_exists() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let killed_mid_copy = partial_exists();
    d.kill();
    let answer = call.await.unwrap().ok();
    let answered = answer.is_some();
    d.restart();
    let mut c = d.controller().await;
    let listed = c
        .list_snapshots(proto::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    if answered {
        assert_eq!(listed.len(), 1, "an answered snapshot survives");
    }
    let mut resumed = false;
    for entry in &listed {
        let s = entry.snapshot.as_ref().unwrap();
        if s.ready_to_use {
            // Whatever is reported ready is complete.
            assert_eq!(checksums(&snaps.join(&s.snapshot_id)), before);
        } else {
            // An interrupted background copy runs again after the restart.
            resumed = true;
            let ready = wait_ready(&mut c, &s.snapshot_id).await;
            assert_eq!(ready.creation_time, s.creation_time);
            assert_eq!(checksums(&snaps.join(&s.snapshot_id)), before);
        }
    }
    assert!(
        !partial_exists(),
        "no partial copy left once every snapshot is ready"
    );
    if listed.is_empty() {
        assert!(
            std::fs::read_dir(&snaps).unwrap().next().is_none(),
            "no unrecorded storage left"
        );
    }
    eprintln!(
        "killed mid-copy: {killed_mid_copy}, answered before the kill: {answered} \
         (ready: {:?}), copy resumed after restart: {resumed}",
        answer.map(|a| a.into_inner().snapshot.unwrap().ready_to_use)
    );
    // The retry converges on a complete snapshot.
    let snap = c
        .create_snapshot(request)
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    let snap = wait_ready(&mut c, &snap.snapshot_id).await;
    assert_eq!(checksums(&snaps.join(&snap.snapshot_id)), before);
}

#[tokio::test]
async fn a_failed_mount_at_staging_leaves_no_loop_device() {
    skip_unless_ready!(tool_missing(&["mkfs.ext4", "losetup"]));
    let d = Driver::start();
    let mut c = d.controller().await;
    let v = create(&mut c, loop_request("pvc-broken", 16 * MIB, "ext4"), None)
        .await
        .unwrap();
    // Destroy the superblock: the mount at staging must fail.
    let image = d
        .data_dir()
        .join("images")
        .join(format!("{}.ext4", v.volume_id));
    std::os::unix::fs::FileExt::write_at(
        &std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap(),
        &vec![0u8; 1 << 20],
        0,
    )
    .unwrap();
    let status = d
        .node()
        .await
        .node_stage_volume(proto::NodeStageVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: d.target("broken-staging"),
            volume_capability: Some(fs_capability("ext4")),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_ne!(status.code(), Code::Ok);
    let attached = Command::new("losetup")
        .arg("-j")
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        attached.stdout.is_empty(),
        "loop device left attached: {}",
        String::from_utf8_lossy(&attached.stdout)
    );
}

/// DeleteSnapshot of a copied directory snapshot removes it file by file, then its record. A
/// SIGKILL part-way used to leave the record (ready) over a partly deleted tree: after the
/// restart the snapshot was listed ready and a restore from it answered OK with files silently
/// missing. The tree is now first renamed to a name recovery removes, so after a crash the
/// snapshot's storage is complete or absent; the CO's retried DeleteSnapshot removes the
/// record.
#[tokio::test]
async fn a_snapshot_delete_killed_part_way_leaves_no_partial_snapshot() {
    let mut d = Driver::start();
    let mut c = d.controller().await;
    let volume = create(&mut c, create_request("pvc-del-kill", 512 * MIB), None)
        .await
        .unwrap();
    let src = dir_volume(&d, &volume.volume_id);
    // 10,000 small files in 200 directories: removing them takes a while, and each directory
    // removed lowers the top directory's link count, which shows the removal under way.
    const DIRS: u64 = 200;
    for i in 0..DIRS {
        let sub = src.join(format!("d{i}"));
        std::fs::create_dir(&sub).unwrap();
        for j in 0..50 {
            std::fs::write(sub.join(format!("f{j}")), format!("{i}/{j}")).unwrap();
        }
    }
    let before = checksums(&src);
    let snap = snapshot(&mut c, "snap-del-kill", &volume.volume_id).await;
    let tree = d.data_dir().join("snapshots").join(&snap.snapshot_id);
    let links = |p: &Path| std::fs::symlink_metadata(p).map(|m| m.nlink()).ok();
    assert_eq!(links(&tree), Some(2 + DIRS));

    let call = {
        let (mut c, id) = (c.clone(), snap.snapshot_id.clone());
        tokio::spawn(async move {
            c.delete_snapshot(proto::DeleteSnapshotRequest {
                snapshot_id: id,
                ..Default::default()
            })
            .await
        })
    };
    // Kill the server as soon as the snapshot's tree starts going (or is moved away).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while links(&tree) == Some(2 + DIRS) {
        assert!(std::time::Instant::now() < deadline, "{}", d.log());
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    d.kill();
    let answered = call.await.unwrap().is_ok();
    d.restart();
    let mut c = d.controller().await;
    let got = c
        .get_snapshot(proto::GetSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await;
    eprintln!("answered before the kill: {answered}; after restart: {got:?}");
    let restore = create(
        &mut c,
        create_request("pvc-del-kill-restore", 512 * MIB),
        Some(snap_source(&snap.snapshot_id)),
    )
    .await;
    eprintln!("restore: {:?}", restore.as_ref().map(|v| &v.volume_id));
    if let Ok(restored) = &restore {
        // A restore that succeeds has every file of the snapshot.
        assert_eq!(
            checksums(&dir_volume(&d, &restored.volume_id)).len(),
            before.len()
        );
        assert_eq!(checksums(&dir_volume(&d, &restored.volume_id)), before);
    }
    assert!(
        tree.exists() || restore.is_err(),
        "restored from absent storage: {restore:?}"
    );
    // The CO's retry completes the deletion.
    c.delete_snapshot(proto::DeleteSnapshotRequest {
        snapshot_id: snap.snapshot_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let listed = c
        .list_snapshots(proto::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(listed.is_empty(), "{listed:?}");
    let left: Vec<_> = std::fs::read_dir(d.data_dir().join("snapshots"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "snapshot storage left: {left:?}");
}

/// A CreateVolume retried for a restore that already happened answers with the existing volume
/// even after its source snapshot was deleted (the provisioner retries after a lost answer),
/// as long as it names the recorded source; another source is still ALREADY_EXISTS.
#[tokio::test]
async fn a_retried_restore_succeeds_after_its_snapshot_was_deleted() {
    let d = Driver::start();
    let mut c = d.controller().await;
    let source = create(&mut c, create_request("retry-src", MIB), None)
        .await
        .unwrap();
    let snap = snapshot(&mut c, "retry-snap", &source.volume_id).await;
    let restored = create(
        &mut c,
        create_request("retry-restored", MIB),
        Some(snap_source(&snap.snapshot_id)),
    )
    .await
    .unwrap();
    c.delete_snapshot(proto::DeleteSnapshotRequest {
        snapshot_id: snap.snapshot_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let again = create(
        &mut c,
        create_request("retry-restored", MIB),
        Some(snap_source(&snap.snapshot_id)),
    )
    .await
    .expect("the retried restore answers with the existing volume");
    assert_eq!(again.volume_id, restored.volume_id);
    let other = create(
        &mut c,
        create_request("retry-restored", MIB),
        Some(volume_source(&source.volume_id)),
    )
    .await
    .expect_err("another content source");
    assert_eq!(other.code(), Code::AlreadyExists, "{other:?}");
}

/// A loop volume created without a capacity range gets the backend's default image size
/// (1 GiB), and that is the size recorded and reported: CreateVolume's answer, its
/// snapshots' size, a restore's limit check and ControllerExpandVolume all see it.
#[tokio::test]
async fn a_loop_volume_without_a_capacity_range_reports_its_real_size() {
    skip_unless_ready!(tool_missing(&["mkfs.ext4"]));
    const GIB: i64 = 1 << 30;
    let d = Driver::start();
    let mut c = d.controller().await;
    let mut request = loop_request("default-size", 0, "ext4");
    request.capacity_range = None;
    let volume = create(&mut c, request, None).await.unwrap();
    assert_eq!(volume.capacity_bytes, GIB, "CreateVolume answer");
    let image = d
        .data_dir()
        .join("images")
        .join(format!("{}.ext4", volume.volume_id));
    assert_eq!(std::fs::metadata(&image).unwrap().len(), GIB as u64);
    let got = c
        .controller_get_volume(proto::ControllerGetVolumeRequest {
            volume_id: volume.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(got.capacity_bytes, GIB, "recorded size");
    let snap = snapshot(&mut c, "default-size-snap", &volume.volume_id).await;
    assert_eq!(snap.size_bytes, GIB, "snapshot size");
    // A restore that may be at most 16 MiB cannot hold a 1 GiB image.
    let mut small = loop_request("default-size-restore", 16 * MIB, "ext4");
    small.capacity_range = Some(proto::CapacityRange {
        required_bytes: 16 * MIB,
        limit_bytes: 16 * MIB,
    });
    let err = create(&mut c, small, Some(snap_source(&snap.snapshot_id)))
        .await
        .expect_err("a 16 MiB restore of a 1 GiB snapshot");
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    // At most 100 MiB would shrink it: OUT_OF_RANGE from the recorded size, not the image's
    // refusal.
    let err = c
        .controller_expand_volume(proto::ControllerExpandVolumeRequest {
            volume_id: volume.volume_id.clone(),
            capacity_range: Some(proto::CapacityRange {
                required_bytes: 100 * MIB,
                limit_bytes: 100 * MIB,
            }),
            ..Default::default()
        })
        .await
        .expect_err("shrinking to 100 MiB");
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    // A limit below the default with nothing required: a volume of the limit's size.
    let mut limited = loop_request("default-size-limited", 0, "ext4");
    limited.capacity_range = Some(proto::CapacityRange {
        required_bytes: 0,
        limit_bytes: 16 * MIB,
    });
    let limited = create(&mut c, limited, None).await.unwrap();
    assert_eq!(limited.capacity_bytes, 16 * MIB);
}

/// Builds `depth` nested directories `d` under `root` (through descriptors: far deeper than
/// PATH_MAX allows as one path) with a file `bottom` at the end.
fn nest_deep(root: &Path, depth: usize) {
    use rustix::fs::{Mode, OFlags};
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let mut cur = rustix::fs::open(root, flags, Mode::empty()).unwrap();
    for _ in 0..depth {
        rustix::fs::mkdirat(&cur, "d", Mode::from_raw_mode(0o755)).unwrap();
        cur = rustix::fs::openat(&cur, "d", flags, Mode::empty()).unwrap();
    }
    let f = rustix::fs::openat(
        &cur,
        "bottom",
        OFlags::WRONLY | OFlags::CREATE | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )
    .unwrap();
    rustix::io::write(&f, b"deep").unwrap();
}

/// The content of `bottom` at the end of `depth` nested `d` directories under `root`.
fn read_deep(root: &Path, depth: usize) -> Vec<u8> {
    use rustix::fs::{Mode, OFlags};
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let top = rustix::fs::open(root, flags, Mode::empty()).unwrap();
    let bottom = (0..depth).fold(top, |fd, _| {
        rustix::fs::openat(&fd, "d", flags, Mode::empty()).unwrap()
    });
    let f = rustix::fs::openat(&bottom, "bottom", OFlags::RDONLY, Mode::empty()).unwrap();
    let mut buf = [0u8; 16];
    let n = rustix::io::read(&f, &mut buf).unwrap();
    buf[..n].to_vec()
}

/// A pod can nest directories as deep as it likes (each `mkdir` is relative). Snapshotting,
/// restoring and cloning such a directory volume copies the whole tree and the server keeps
/// serving: the copy neither recurses once per level on its worker thread's stack nor holds
/// two descriptors open per level.
#[tokio::test]
async fn a_very_deep_tree_is_snapshotted_restored_and_cloned() {
    const DEPTH: usize = 30_000;
    let d = Driver::start();
    let mut c = d.controller().await;
    let source = create(&mut c, create_request("deep-src", 8 * MIB), None)
        .await
        .unwrap();
    nest_deep(&dir_volume(&d, &source.volume_id), DEPTH);
    let snap = snapshot(&mut c, "deep-snap", &source.volume_id).await;
    let restored = create(
        &mut c,
        create_request("deep-restored", 8 * MIB),
        Some(snap_source(&snap.snapshot_id)),
    )
    .await
    .expect("restore of a deep tree");
    assert_eq!(
        read_deep(&dir_volume(&d, &restored.volume_id), DEPTH),
        b"deep"
    );
    let clone = create(
        &mut c,
        create_request("deep-clone", 8 * MIB),
        Some(volume_source(&source.volume_id)),
    )
    .await
    .expect("clone of a deep tree");
    assert_eq!(read_deep(&dir_volume(&d, &clone.volume_id), DEPTH), b"deep");
    c.delete_snapshot(proto::DeleteSnapshotRequest {
        snapshot_id: snap.snapshot_id.clone(),
        ..Default::default()
    })
    .await
    .expect("deleting the deep snapshot");
    assert!(
        !d.data_dir()
            .join("snapshots")
            .join(&snap.snapshot_id)
            .exists()
    );
    // Deleted volumes' trees are removed in the background: wait until the trash is empty
    // (the test's own temporary directory could not remove them either: std's remove_dir_all
    // recurses).
    for volume in [&restored, &clone, &source] {
        c.delete_volume(proto::DeleteVolumeRequest {
            volume_id: volume.volume_id.clone(),
            ..Default::default()
        })
        .await
        .expect("deleting a deep volume");
    }
    let trash = d.data_dir().join("trash");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let left: Vec<_> = std::fs::read_dir(&trash)
            .map(|bins| {
                bins.flatten()
                    .flat_map(|bin| std::fs::read_dir(bin.path()).into_iter().flatten())
                    .flatten()
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default();
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still in the trash: {left:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(
        std::fs::read_dir(d.data_dir().join("volumes"))
            .unwrap()
            .next()
            .is_none()
    );
}

/// Whether every byte of the file at `path` has a block behind it.
fn fully_allocated(path: &Path) -> bool {
    let meta = std::fs::metadata(path).unwrap();
    meta.blocks() * 512 >= meta.len()
}

/// `allocation: preallocate` promises a volume whose blocks are all set aside at CreateVolume;
/// a restore or a clone is a CreateVolume too. The copy keeps holes, and on ext4 the blocks a
/// preallocated image never wrote read as holes, so the new image must be allocated after it.
#[tokio::test]
async fn restores_and_clones_of_preallocated_loop_volumes_are_preallocated() {
    skip_unless_ready!(tool_missing(&["mkfs.ext4"]));
    let d = Driver::start();
    let mut c = d.controller().await;
    let preallocated = |name: &str, bytes: i64| {
        let mut request = loop_request(name, bytes, "ext4");
        request
            .parameters
            .insert("allocation".into(), "preallocate".into());
        request
    };
    let image = |id: &str| d.data_dir().join("images").join(format!("{id}.ext4"));
    let source = create(&mut c, preallocated("prealloc-src", 64 * MIB), None)
        .await
        .unwrap();
    assert!(fully_allocated(&image(&source.volume_id)), "the source");
    let snap = snapshot(&mut c, "prealloc-snap", &source.volume_id).await;
    let restored = create(
        &mut c,
        preallocated("prealloc-restored", 96 * MIB),
        Some(snap_source(&snap.snapshot_id)),
    )
    .await
    .unwrap();
    assert_eq!(restored.capacity_bytes, 96 * MIB);
    let restored_image = image(&restored.volume_id);
    assert_eq!(
        std::fs::metadata(&restored_image).unwrap().len(),
        96 * MIB as u64
    );
    assert!(fully_allocated(&restored_image), "the restore");
    let clone = create(
        &mut c,
        preallocated("prealloc-clone", 64 * MIB),
        Some(volume_source(&source.volume_id)),
    )
    .await
    .unwrap();
    assert!(fully_allocated(&image(&clone.volume_id)), "the clone");
    // Both still hold the source's filesystem.
    for id in [&restored.volume_id, &clone.volume_id] {
        let out = Command::new("blkid")
            .args(["-p", "-o", "value", "-s", "TYPE"])
            .arg(image(id))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ext4");
    }
}

/// A published `dir` volume is copied while its pod works in it, and pods create and remove
/// files all the time (temporary files, writes by rename). A file removed or replaced between
/// the copy's look at a name and its open is not an error: the snapshot takes what is there
/// (or nothing), each file consistent, as for a file removed before the look.
#[tokio::test]
async fn a_snapshot_of_a_volume_whose_files_come_and_go_succeeds() {
    const FILES: usize = 500;
    let d = Driver::start();
    let mut c = d.controller().await;
    let source = create(&mut c, create_request("churn-src", 8 * MIB), None)
        .await
        .unwrap();
    let root = dir_volume(&d, &source.volume_id);
    std::fs::write(root.join("stable"), b"kept").unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churners: Vec<_> = (0..3)
        .map(|t| {
            let (root, stop) = (root.join(format!("tmp{t}")), stop.clone());
            std::fs::create_dir(&root).unwrap();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for i in 0..FILES {
                        let file = root.join(format!("f{i}"));
                        let dir = root.join(format!("d{i}"));
                        // A file written by rename, a file removed, a directory removed.
                        let _ = std::fs::write(root.join("new"), b"v");
                        let _ = std::fs::rename(root.join("new"), &file);
                        let _ = std::fs::remove_file(root.join(format!("f{}", (i + 7) % FILES)));
                        let _ = std::fs::create_dir(&dir);
                        let _ = std::fs::write(dir.join("x"), b"x");
                        let _ =
                            std::fs::remove_dir_all(root.join(format!("d{}", (i + 13) % FILES)));
                    }
                }
            })
        })
        .collect();
    let mut failures = Vec::new();
    for round in 0..20 {
        match c
            .create_snapshot(proto::CreateSnapshotRequest {
                source_volume_id: source.volume_id.clone(),
                name: format!("churn-snap-{round}"),
                ..Default::default()
            })
            .await
        {
            Ok(answer) => {
                let snap = answer.into_inner().snapshot.unwrap();
                // A background copy that fails removes its snapshot: GetSnapshot NOT_FOUND.
                let mut ready = snap.ready_to_use;
                while !ready {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    match c
                        .get_snapshot(proto::GetSnapshotRequest {
                            snapshot_id: snap.snapshot_id.clone(),
                            ..Default::default()
                        })
                        .await
                    {
                        Ok(got) => ready = got.into_inner().snapshot.unwrap().ready_to_use,
                        Err(status) => {
                            failures.push(format!("background copy: {status:?}"));
                            break;
                        }
                    }
                }
                if !ready {
                    continue;
                }
                let stable = d
                    .data_dir()
                    .join("snapshots")
                    .join(&snap.snapshot_id)
                    .join("stable");
                assert_eq!(std::fs::read(stable).unwrap(), b"kept");
            }
            Err(status) => failures.push(status.message().to_string()),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for churn in churners {
        churn.join().unwrap();
    }
    assert!(
        failures.is_empty(),
        "{} of 20 failed: {failures:#?}",
        failures.len()
    );
}

/// Hard links deep in a tree: the path of the first copy of a linked file is longer than
/// PATH_MAX below the copy's root, and the link to it is still made.
#[tokio::test]
async fn hard_links_deeper_than_path_max_are_kept() {
    use rustix::fs::{AtFlags, Mode, OFlags};
    const DEPTH: usize = 2_500;
    let d = Driver::start();
    let mut c = d.controller().await;
    let source = create(&mut c, create_request("deep-links-src", 8 * MIB), None)
        .await
        .unwrap();
    nest_deep(&dir_volume(&d, &source.volume_id), DEPTH);
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let bottom_dir = |root: &Path| {
        let top = rustix::fs::open(root, flags, Mode::empty()).unwrap();
        (0..DEPTH).fold(top, |fd, _| {
            rustix::fs::openat(&fd, "d", flags, Mode::empty()).unwrap()
        })
    };
    let dir = bottom_dir(&dir_volume(&d, &source.volume_id));
    rustix::fs::linkat(&dir, "bottom", &dir, "again", AtFlags::empty()).unwrap();
    drop(dir);
    let snap = snapshot(&mut c, "deep-links-snap", &source.volume_id).await;
    let copied = bottom_dir(&d.data_dir().join("snapshots").join(&snap.snapshot_id));
    let first = rustix::fs::statat(&copied, "bottom", AtFlags::SYMLINK_NOFOLLOW).unwrap();
    let again = rustix::fs::statat(&copied, "again", AtFlags::SYMLINK_NOFOLLOW).unwrap();
    assert_eq!(first.st_ino, again.st_ino, "the hard link is kept");
    assert_eq!(first.st_nlink, 2);
}
