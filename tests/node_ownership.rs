//! Node calls act only on what belongs to the volume they name, against the real server: a
//! publish binds only from where that volume is staged, a stage or unstage never takes another
//! volume's (or the kubelet's) mount for its own, an unpublish never removes a file or directory
//! it did not publish, two volumes published at one target at the same moment never stack, and
//! a publication whose filesystem died (a FUSE daemon gone) can still be unpublished, and a
//! read-only publication of a raw block volume cannot write the volume; and none of these
//! checks refuses what is legitimately the volume's: a shared volume whose share is a new
//! superblock at every mount, or a volume staged again after a reboot with edited mount
//! options. Mounting
//! needs root, loop volumes also mkfs.ext4; each test skips with a printed reason otherwise.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{Driver, create_request, publish_request};
use k8scsi::client::mount_capability;
use k8scsi::csi::proto::volume_capability::AccessType;
use k8scsi::csi::proto::volume_capability::access_mode::Mode;
use k8scsi::csi::proto::{self, VolumeCapability};
use tonic::Code;

const MIB: i64 = 1 << 20;

fn loop_skip_reason() -> Option<String> {
    if !common::is_root() {
        return Some("loop volumes need root (loop devices, mounts); CI runs this as root".into());
    }
    let found = std::process::Command::new("mkfs.ext4")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    (!found).then(|| "mkfs.ext4 (e2fsprogs) is not installed".to_string())
}

fn ext4(mode: Mode) -> VolumeCapability {
    let mut capability = mount_capability(mode, vec![]);
    if let Some(AccessType::Mount(mount)) = capability.access_type.as_mut() {
        mount.fs_type = "ext4".to_string();
    }
    capability
}

async fn create_loop_volume(driver: &Driver, name: &str) -> String {
    let mut controller = driver.controller().await;
    let request = proto::CreateVolumeRequest {
        name: name.to_string(),
        capacity_range: Some(proto::CapacityRange {
            required_bytes: 32 * MIB,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![ext4(Mode::SingleNodeWriter)],
        parameters: HashMap::from([("type".to_string(), "loop".to_string())]),
        ..Default::default()
    };
    common::create_ok(&mut controller, request).await.volume_id
}

async fn stage(driver: &Driver, id: &str, staging: &str, mode: Mode) -> Result<(), tonic::Status> {
    let request = proto::NodeStageVolumeRequest {
        volume_id: id.to_string(),
        staging_target_path: staging.to_string(),
        volume_capability: Some(ext4(mode)),
        ..Default::default()
    };
    driver
        .node()
        .await
        .node_stage_volume(request)
        .await
        .map(drop)
}

async fn unstage(driver: &Driver, id: &str, staging: &str) -> Result<(), tonic::Status> {
    let request = proto::NodeUnstageVolumeRequest {
        volume_id: id.to_string(),
        staging_target_path: staging.to_string(),
    };
    driver
        .node()
        .await
        .node_unstage_volume(request)
        .await
        .map(drop)
}

async fn publish_staged(
    driver: &Driver,
    id: &str,
    staging: &str,
    target: &str,
) -> Result<(), tonic::Status> {
    let mut request = publish_request(id, target, false);
    request.volume_capability = Some(ext4(Mode::SingleNodeWriter));
    request.staging_target_path = staging.to_string();
    driver
        .node()
        .await
        .node_publish_volume(request)
        .await
        .map(drop)
}

async fn unpublish(driver: &Driver, id: &str, target: &str) -> Result<(), tonic::Status> {
    let request = proto::NodeUnpublishVolumeRequest {
        volume_id: id.to_string(),
        target_path: target.to_string(),
    };
    driver
        .node()
        .await
        .node_unpublish_volume(request)
        .await
        .map(drop)
}

fn assert_code(result: Result<(), tonic::Status>, code: Code, what: &str) {
    match result {
        Err(status) if status.code() == code => {}
        other => panic!("{what}: expected {code:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn publish_binds_only_from_where_the_volume_is_staged() {
    skip_unless_ready!(loop_skip_reason());
    let driver = Driver::start();
    let a = create_loop_volume(&driver, "a").await;
    let b = create_loop_volume(&driver, "b").await;
    let staging_a = driver.target("stage-a");
    stage(&driver, &a, &staging_a, Mode::SingleNodeWriter)
        .await
        .unwrap();
    std::fs::write(Path::new(&staging_a).join("file-of-a"), b"a").unwrap();

    // B was never staged: publishing it "from" A's staging path would hand A's data to B's pod.
    let target_b = driver.target("pod-b");
    assert_code(
        publish_staged(&driver, &b, &staging_a, &target_b).await,
        Code::FailedPrecondition,
        "publish B from A's staging path",
    );
    assert!(!common::is_mounted(Path::new(&target_b)));

    // A staging path that is a symlink to the host's root is not where anything was staged.
    let link = driver.kubelet_dir().join("pods/evil");
    std::os::unix::fs::symlink("/", &link).unwrap();
    let target_c = driver.target("pod-c");
    let refused = publish_staged(&driver, &b, &link.to_string_lossy(), &target_c).await;
    assert!(refused.is_err(), "publish from a symlink to /: {refused:?}");
    assert!(!common::is_mounted(Path::new(&target_c)));
    assert!(!Path::new(&target_c).join("etc/passwd").exists());

    // Where A is staged, A publishes as before.
    let target_a = driver.target("pod-a");
    publish_staged(&driver, &a, &staging_a, &target_a)
        .await
        .unwrap();
    assert!(Path::new(&target_a).join("file-of-a").exists());
    unpublish(&driver, &a, &target_a).await.unwrap();
    unstage(&driver, &a, &staging_a).await.unwrap();
}

#[tokio::test]
async fn stage_and_unstage_never_take_another_mount_for_the_volumes_own() {
    skip_unless_ready!(loop_skip_reason());
    let driver = Driver::start();
    let a = create_loop_volume(&driver, "a").await;
    let b = create_loop_volume(&driver, "b").await;
    let staging_a = driver.target("stage-a");
    stage(&driver, &a, &staging_a, Mode::SingleNodeWriter)
        .await
        .unwrap();
    let target_a = driver.target("pod-a");
    publish_staged(&driver, &a, &staging_a, &target_a)
        .await
        .unwrap();

    // Staging B where A is mounted is not "already staged".
    assert_code(
        stage(&driver, &b, &staging_a, Mode::SingleNodeWriter).await,
        Code::FailedPrecondition,
        "stage B over A's staging mount",
    );
    assert_eq!(
        common::loop_devices_under(driver.dir.path()).len(),
        1,
        "B's image was attached for nothing"
    );
    // Unstaging B there must not unmount A under its running pod.
    assert_code(
        unstage(&driver, &b, &staging_a).await,
        Code::FailedPrecondition,
        "unstage B at A's staging path",
    );
    assert!(common::is_mounted(Path::new(&staging_a)));
    assert!(common::is_mounted(Path::new(&target_a)));

    // Nor a tmpfs of the kubelet's (a pod's secret volume) that B was never staged at.
    let secret = driver.kubelet_dir().join("pods/p9/secret");
    std::fs::create_dir_all(&secret).unwrap();
    rustix::mount::mount(
        "tmpfs",
        &secret,
        "tmpfs",
        rustix::mount::MountFlags::empty(),
        None,
    )
    .unwrap();
    assert_code(
        unstage(&driver, &b, &secret.to_string_lossy()).await,
        Code::FailedPrecondition,
        "unstage B at a kubelet tmpfs",
    );
    assert!(common::is_mounted(&secret));
    rustix::mount::unmount(&secret, rustix::mount::UnmountFlags::empty()).unwrap();

    // Staging A again at its path with another capability is a conflict, not a silent rewrite.
    assert_code(
        stage(&driver, &a, &staging_a, Mode::SingleNodeSingleWriter).await,
        Code::AlreadyExists,
        "stage A again with another access mode",
    );
    stage(&driver, &a, &staging_a, Mode::SingleNodeWriter)
        .await
        .unwrap();

    unpublish(&driver, &a, &target_a).await.unwrap();
    unstage(&driver, &a, &staging_a).await.unwrap();
    assert!(!common::is_mounted(Path::new(&staging_a)));
}

#[tokio::test]
async fn unpublish_removes_only_what_it_published() {
    let driver = Driver::start();
    let mut controller = driver.controller().await;
    let volume = common::create_ok(&mut controller, create_request("v", MIB))
        .await
        .volume_id;
    let kubelet = driver.kubelet_dir();
    let config = kubelet.join("config.yaml");
    std::fs::write(&config, b"kind: KubeletConfiguration\n").unwrap();
    let registry = kubelet.join("plugins_registry");
    std::fs::create_dir_all(&registry).unwrap();
    let never_published = driver.target("p1");
    std::fs::create_dir(&never_published).unwrap();

    for (id, path) in [
        (
            "dir-00000000000000000000000000000000",
            config.to_string_lossy(),
        ),
        (volume.as_str(), config.to_string_lossy()),
        (volume.as_str(), registry.to_string_lossy()),
        (volume.as_str(), never_published.as_str().into()),
    ] {
        let result = unpublish(&driver, id, &path).await;
        assert!(
            result.is_ok()
                || result
                    .as_ref()
                    .is_err_and(|s| s.code() == Code::InvalidArgument),
            "unpublish {id} at {path}: {result:?}"
        );
    }
    assert!(config.exists(), "a kubelet file was deleted");
    assert!(registry.exists(), "a kubelet directory was removed");
    assert!(Path::new(&never_published).exists());

    // What was published is unmounted and removed as before.
    require_root!();
    let target = driver.target("p2");
    driver
        .node()
        .await
        .node_publish_volume(publish_request(&volume, &target, false))
        .await
        .unwrap();
    unpublish(&driver, &volume, &target).await.unwrap();
    assert!(!Path::new(&target).exists());
}

#[tokio::test]
async fn two_volumes_published_at_one_target_at_once_never_stack() {
    require_root!();
    let driver = Driver::start();
    let mut controller = driver.controller().await;
    let a = common::create_ok(&mut controller, create_request("a", MIB))
        .await
        .volume_id;
    let b = common::create_ok(&mut controller, create_request("b", MIB))
        .await
        .volume_id;
    for round in 0..20 {
        let target = driver.target(&format!("pod-{round}"));
        let (mut node_a, mut node_b) = (driver.node().await, driver.node().await);
        let (for_a, for_b) = tokio::join!(
            node_a.node_publish_volume(publish_request(&a, &target, false)),
            node_b.node_publish_volume(publish_request(&b, &target, false)),
        );
        let stacked = common::mounts_under(Path::new(&target));
        assert!(
            stacked.len() <= 1 && !(for_a.is_ok() && for_b.is_ok()),
            "round {round}: both publishes answered {for_a:?} / {for_b:?}, mounts {stacked:?}"
        );
        for (id, result) in [(&a, for_a), (&b, for_b)] {
            if result.is_ok() {
                unpublish(&driver, id, &target).await.unwrap();
            }
        }
        assert!(common::mounts_under(Path::new(&target)).is_empty());
    }
}

#[tokio::test]
async fn a_publication_whose_filesystem_died_can_be_unpublished() {
    use std::os::fd::AsRawFd;
    require_root!();
    let Ok(fuse) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    else {
        eprintln!("SKIPPED: /dev/fuse is not available");
        return;
    };
    let driver = Driver::start();
    let mut controller = driver.controller().await;
    let volume = common::create_ok(&mut controller, create_request("v", MIB))
        .await
        .volume_id;
    let target = driver.target("pod");
    let mut node = driver.node().await;
    node.node_publish_volume(publish_request(&volume, &target, false))
        .await
        .unwrap();
    // A FUSE filesystem stacked on the publication whose daemon is gone: every look at the
    // path fails with ENOTCONN at once (a stale NFS handle fails the same way with ESTALE).
    let options = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0",
        fuse.as_raw_fd()
    );
    let options = std::ffi::CString::new(options).unwrap();
    rustix::mount::mount(
        "dead",
        target.as_str(),
        "fuse",
        rustix::mount::MountFlags::empty(),
        Some(options.as_c_str()),
    )
    .unwrap();
    drop(fuse);
    let error = std::fs::metadata(&target).unwrap_err();
    assert_eq!(
        error.raw_os_error(),
        Some(rustix::io::Errno::NOTCONN.raw_os_error())
    );

    let stats = node
        .node_get_volume_stats(proto::NodeGetVolumeStatsRequest {
            volume_id: volume.clone(),
            volume_path: target.clone(),
            ..Default::default()
        })
        .await
        .expect("stats of a dead publication answer with a condition")
        .into_inner();
    assert!(
        stats.volume_condition.as_ref().is_some_and(|c| c.abnormal),
        "{stats:?}"
    );

    unpublish(&driver, &volume, &target).await.unwrap();
    assert!(common::mounts_under(Path::new(&target)).is_empty());
    assert!(!Path::new(&target).exists());
    // And it is forgotten: unpublishing again is a no-op.
    unpublish(&driver, &volume, &target).await.unwrap();
}

#[tokio::test]
async fn a_read_only_block_publication_cannot_write_the_volume() {
    use std::io::{Read, Write};
    skip_unless_ready!(loop_skip_reason());
    let driver = Driver::start();
    let block = VolumeCapability {
        access_type: Some(AccessType::Block(proto::volume_capability::BlockVolume {})),
        access_mode: Some(proto::volume_capability::AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    };
    let mut controller = driver.controller().await;
    let request = proto::CreateVolumeRequest {
        name: "raw".to_string(),
        capacity_range: Some(proto::CapacityRange {
            required_bytes: 32 * MIB,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![block.clone()],
        parameters: HashMap::from([("type".to_string(), "loop".to_string())]),
        ..Default::default()
    };
    let id = common::create_ok(&mut controller, request).await.volume_id;
    let staging = driver.target("stage");
    let mut node = driver.node().await;
    node.node_stage_volume(proto::NodeStageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.clone(),
        volume_capability: Some(block.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    let publish = |target: &str, readonly: bool| {
        let mut request = publish_request(&id, target, readonly);
        request.volume_capability = Some(block.clone());
        request.staging_target_path = staging.clone();
        request
    };
    let writer = driver.kubelet_dir().join("pods/writer/dev");
    let reader = driver.kubelet_dir().join("pods/reader/dev");
    std::fs::create_dir_all(writer.parent().unwrap()).unwrap();
    std::fs::create_dir_all(reader.parent().unwrap()).unwrap();
    let (writer, reader) = (writer.to_string_lossy(), reader.to_string_lossy());
    node.node_publish_volume(publish(&writer, false))
        .await
        .unwrap();
    node.node_publish_volume(publish(&reader, true))
        .await
        .unwrap();

    let block_of = |byte: u8| vec![byte; 4096];
    let mut device = std::fs::OpenOptions::new()
        .write(true)
        .open(writer.as_ref())
        .unwrap();
    device.write_all(&block_of(0xa5)).unwrap();
    device.sync_all().unwrap();

    // The read-only publication refuses to be opened for writing, or at least to write.
    let written = std::fs::OpenOptions::new()
        .write(true)
        .open(reader.as_ref())
        .and_then(|mut f| {
            f.write_all(&block_of(0x5a))?;
            f.sync_all()
        });
    assert!(written.is_err(), "wrote through the read-only publication");
    let mut seen = vec![0u8; 4096];
    let mut through_reader = std::fs::File::open(reader.as_ref()).unwrap();
    through_reader.read_exact(&mut seen).unwrap();
    assert_eq!(seen, block_of(0xa5), "the reader sees the writer's data");
    drop((device, through_reader));

    for target in [&writer, &reader] {
        unpublish(&driver, &id, target).await.unwrap();
    }
    unstage(&driver, &id, &staging).await.unwrap();
    assert!(
        common::loop_devices_under(driver.dir.path()).is_empty(),
        "a loop device outlived the staging"
    );
}

#[tokio::test]
async fn a_volume_staged_again_after_a_reboot_takes_the_new_mount_options() {
    skip_unless_ready!(loop_skip_reason());
    let mut driver = Driver::start();
    let id = create_loop_volume(&driver, "v").await;
    let staging = driver.target("stage");
    stage(&driver, &id, &staging, Mode::SingleNodeWriter)
        .await
        .unwrap();
    // A reboot: the process, the mount and the loop device go; the records stay.
    driver.kill();
    rustix::mount::unmount(staging.as_str(), rustix::mount::UnmountFlags::empty()).unwrap();
    for device in common::loop_devices_under(driver.dir.path()) {
        let detached = std::process::Command::new("losetup")
            .args(["-d", &device])
            .status()
            .unwrap();
        assert!(detached.success(), "losetup -d {device}");
    }
    driver.restart();
    // The PV's mount options were edited meanwhile: the kubelet stages with the new ones.
    let mut capability = ext4(Mode::SingleNodeWriter);
    if let Some(AccessType::Mount(mount)) = capability.access_type.as_mut() {
        mount.mount_flags = vec!["noatime".to_string()];
    }
    let request = proto::NodeStageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.clone(),
        volume_capability: Some(capability),
        ..Default::default()
    };
    driver
        .node()
        .await
        .node_stage_volume(request)
        .await
        .expect("staging again after a reboot");
    assert!(common::is_mounted(Path::new(&staging)));
    unstage(&driver, &id, &staging).await.unwrap();
}

#[tokio::test]
async fn a_shared_volume_on_a_share_mounted_as_a_new_superblock_each_time_publishes() {
    use std::os::unix::fs::PermissionsExt;
    require_root!();
    // An overlay over a directory of the test's share stands in for a FUSE share or NFS with
    // `nosharecache`: every mount of it is a new superblock with a new device number.
    let share = common::share::Share::new();
    let scratch = tempfile::tempdir().unwrap();
    let lower = scratch.path().join("lower");
    std::fs::create_dir(&lower).unwrap();
    let (upper, work) = (share.view().join("upper"), share.view().join("work"));
    std::fs::create_dir(&upper).unwrap();
    std::fs::create_dir(&work).unwrap();
    let program = scratch.path().join("mount-share");
    let script = format!(
        "#!/bin/sh\nfor last; do :; done\nexec mount -t overlay overlay -o \
         lowerdir={},upperdir={},workdir={},index=off,nosuid,nodev \"$last\"\n",
        lower.display(),
        upper.display(),
        work.display()
    );
    std::fs::write(&program, script).unwrap();
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
    let driver = Driver::start_with(&["--mount-program", &program.to_string_lossy()]);
    let capability = mount_capability(Mode::MultiNodeMultiWriter, vec![]);
    let mut controller = driver.controller().await;
    let request = proto::CreateVolumeRequest {
        name: "shared".to_string(),
        capacity_range: Some(proto::CapacityRange {
            required_bytes: 16 * MIB,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![capability.clone()],
        parameters: share.params(&[]),
        ..Default::default()
    };
    let id = common::create_ok(&mut controller, request).await.volume_id;
    let staging = driver.target("stage");
    let mut node = driver.node().await;
    node.node_stage_volume(proto::NodeStageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.clone(),
        volume_capability: Some(capability.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    std::fs::write(Path::new(&staging).join("hello"), b"x").unwrap();
    let target = driver.target("pod");
    let mut request = publish_request(&id, &target, false);
    request.volume_capability = Some(capability);
    request.staging_target_path = staging.clone();
    node.node_publish_volume(request)
        .await
        .expect("publish of a staged shared volume");
    assert!(Path::new(&target).join("hello").exists());
    unpublish(&driver, &id, &target).await.unwrap();
    unstage(&driver, &id, &staging).await.unwrap();
}
