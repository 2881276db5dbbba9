//! Faults below the driver: a node reboot (every mount and loop device gone while the store says
//! the volumes are published), a full data filesystem (creates, expansions, snapshots and
//! restores), a read-only or vanished data directory, a corrupted loop image, and state store
//! files from a newer or older schema version or from an initialisation that never committed.
//!
//! Each test uses only its own resources: its temporary directory, the mounts under it and the
//! loop devices backing its own image files. Root and the loop tools are needed; the tests skip
//! with a printed reason otherwise (and fail in CI, which requires the tools).

mod common;

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::Driver;
use k8scsi::client::mount_capability;
use k8scsi::csi::proto::controller_client::ControllerClient;
use k8scsi::csi::proto::node_client::NodeClient;
use k8scsi::csi::proto::volume_capability::access_mode::Mode;
use k8scsi::csi::proto::volume_capability::{AccessMode, AccessType, BlockVolume};
use k8scsi::csi::proto::{self, VolumeCapability};
use tonic::Code;
use tonic::transport::Channel;

const MIB: i64 = 1 << 20;

fn skip_reason() -> Option<String> {
    if !common::is_root() {
        return Some("needs root (mounts, loop devices)".into());
    }
    for tool in ["losetup", "mkfs.ext4"] {
        if Command::new(tool).arg("-V").output().is_err() {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Dir,
    Ext4,
    Block,
    /// `type: shared` on a share that outlives the node's reboot (like an NFS server).
    Shared,
}

fn capability(kind: Kind) -> VolumeCapability {
    match kind {
        Kind::Dir | Kind::Shared => mount_capability(Mode::SingleNodeWriter, vec![]),
        Kind::Ext4 => {
            let mut cap = mount_capability(Mode::SingleNodeWriter, vec![]);
            if let Some(AccessType::Mount(m)) = cap.access_type.as_mut() {
                m.fs_type = "ext4".into();
            }
            cap
        }
        Kind::Block => VolumeCapability {
            access_type: Some(AccessType::Block(BlockVolume {})),
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
        },
    }
}

fn parameters(kind: Kind) -> HashMap<String, String> {
    match kind {
        Kind::Dir => common::unenforced(),
        Kind::Ext4 | Kind::Block => [("type".to_string(), "loop".to_string())].into(),
        Kind::Shared => panic!("shared volumes take their share's parameters"),
    }
}

fn create_request(name: &str, kind: Kind, bytes: i64) -> proto::CreateVolumeRequest {
    proto::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(proto::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![capability(kind)],
        parameters: parameters(kind),
        ..Default::default()
    }
}

struct Vol {
    id: String,
    kind: Kind,
    staging: String,
    target: String,
}

impl Vol {
    fn data(&self) -> PathBuf {
        match self.kind {
            Kind::Block => PathBuf::from(&self.target),
            _ => Path::new(&self.target).join("data"),
        }
    }
}

async fn stage_and_publish(node: &mut NodeClient<Channel>, v: &Vol) {
    node.node_stage_volume(proto::NodeStageVolumeRequest {
        volume_id: v.id.clone(),
        staging_target_path: v.staging.clone(),
        volume_capability: Some(capability(v.kind)),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("stage {:?}: {e:?}", v.kind));
    node.node_publish_volume(proto::NodePublishVolumeRequest {
        volume_id: v.id.clone(),
        staging_target_path: v.staging.clone(),
        target_path: v.target.clone(),
        volume_capability: Some(capability(v.kind)),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("publish {:?}: {e:?}", v.kind));
}

async fn tear_down(c: &mut ControllerClient<Channel>, node: &mut NodeClient<Channel>, v: &Vol) {
    node.node_unpublish_volume(proto::NodeUnpublishVolumeRequest {
        volume_id: v.id.clone(),
        target_path: v.target.clone(),
    })
    .await
    .unwrap();
    node.node_unstage_volume(proto::NodeUnstageVolumeRequest {
        volume_id: v.id.clone(),
        staging_target_path: v.staging.clone(),
    })
    .await
    .unwrap();
    c.delete_volume(proto::DeleteVolumeRequest {
        volume_id: v.id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
}

fn write_block(path: &Path, payload: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.write_all(payload).unwrap();
    f.sync_all().unwrap();
}

fn read_prefix(path: &Path, len: usize) -> Vec<u8> {
    let mut f =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

/// Waits (polling, generously) until `cond` holds.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A "reboot": the server dies, every mount under the test's directory goes and every loop
/// device of its images is detached, while the store still records the stagings and
/// publications. The kubelet then stages and publishes again at the same paths; every volume
/// comes back with its data, and a full teardown leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reboot_loses_mounts_and_devices_and_restage_brings_data_back() {
    skip_unless_ready!(skip_reason());
    let mut d = tokio::task::block_in_place(Driver::start);
    let mut c = d.controller().await;
    let mut node = d.node().await;
    let mut vols = Vec::new();
    // The share's loop device and the test's own mount of it live outside the driver's
    // directory: the "server" survives the node's reboot, the node's mounts of it do not.
    let share = tokio::task::block_in_place(common::share::Share::new);
    let kinds = [Kind::Dir, Kind::Ext4, Kind::Block, Kind::Shared];
    for (i, kind) in kinds.into_iter().enumerate() {
        let bytes = if matches!(kind, Kind::Dir | Kind::Shared) {
            MIB
        } else {
            16 * MIB
        };
        let mut request = match kind {
            Kind::Shared => proto::CreateVolumeRequest {
                parameters: share.params(&[]),
                ..create_request(&format!("reboot-{i}"), Kind::Dir, bytes)
            },
            _ => create_request(&format!("reboot-{i}"), kind, bytes),
        };
        request.volume_capabilities = vec![capability(kind)];
        let id = common::create_ok(&mut c, request).await.volume_id;
        let v = Vol {
            id,
            kind,
            staging: d.target(&format!("reboot-{i}-staging")),
            target: d.target(&format!("reboot-{i}")),
        };
        stage_and_publish(&mut node, &v).await;
        let payload = format!("before the reboot {i} {:?}", kind).into_bytes();
        write_block(&v.data(), &payload);
        vols.push((v, payload));
    }

    tokio::task::block_in_place(|| {
        d.kill();
        for point in common::mounts_under(d.dir.path()) {
            rustix::mount::unmount(&point, rustix::mount::UnmountFlags::empty())
                .unwrap_or_else(|e| panic!("unmount {}: {e}", point.display()));
        }
        for device in common::loop_devices_under(d.dir.path()) {
            let out = Command::new("losetup")
                .args(["-d", &device])
                .output()
                .unwrap();
            assert!(out.status.success(), "losetup -d {device}: {out:?}");
        }
        eventually("our loop devices to go", || {
            common::loop_devices_under(d.dir.path()).is_empty()
        });
        assert!(common::mounts_under(d.dir.path()).is_empty());
        d.restart();
    });

    let mut c = d.controller().await;
    let mut node = d.node().await;
    for (v, payload) in &vols {
        stage_and_publish(&mut node, v).await;
        assert!(common::is_mounted(Path::new(&v.target)), "{:?}", v.kind);
        let got = tokio::task::block_in_place(|| read_prefix(&v.data(), payload.len()));
        assert_eq!(&got, payload, "{:?} volume lost its data", v.kind);
    }
    for (v, _) in &vols {
        tear_down(&mut c, &mut node, v).await;
    }
    tokio::task::block_in_place(|| {
        eventually("loop devices to be released", || {
            common::loop_devices_under(d.dir.path()).is_empty()
        });
        assert!(common::mounts_under(d.dir.path()).is_empty());
    });
    assert!(
        std::fs::read_dir(d.data_dir().join("images"))
            .unwrap()
            .next()
            .is_none()
    );
}

/// A small ext4 filesystem on a loop device of its own, mounted at `at`; detached on drop.
struct TinyFs {
    image: tempfile::TempDir,
    at: PathBuf,
}

impl TinyFs {
    fn mount(at: &Path, mib: u64) -> TinyFs {
        let image = tempfile::Builder::new()
            .prefix("k8scsi-tinyfs-")
            .tempdir()
            .unwrap();
        let file = image.path().join("fs.img");
        let f = std::fs::File::create(&file).unwrap();
        f.set_len(mib << 20).unwrap();
        drop(f);
        let out = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let out = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&file)
            .arg(at)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        TinyFs {
            image,
            at: at.to_path_buf(),
        }
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        // The mount's loop device was set up by mount(8) with autoclear: unmounting frees it.
        let _ = rustix::mount::unmount(&self.at, rustix::mount::UnmountFlags::DETACH);
        let _ = &self.image;
    }
}

/// Everything below `dir` (relative paths), for "nothing changed on disk" checks.
fn tree(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            out.push(p.strip_prefix(base).unwrap().to_string_lossy().into_owned());
            if e.file_type().unwrap().is_dir() {
                walk(base, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The data directory on a 24 MiB filesystem: volumes that do not fit fail with
/// RESOURCE_EXHAUSTED and leave no image behind, growth past the free space fails the same way,
/// and the driver (and its store, which lives elsewhere) stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_data_filesystem_fails_cleanly_with_resource_exhausted() {
    skip_unless_ready!(skip_reason());
    let mut tiny = None;
    let d = tokio::task::block_in_place(|| {
        Driver::start_on(|data| tiny = Some(TinyFs::mount(data, 24)))
    });
    let _tiny = tiny.unwrap();
    let mut c = d.controller().await;
    let preallocated = |name: &str, bytes: i64| {
        let mut r = create_request(name, Kind::Ext4, bytes);
        r.parameters
            .insert("allocation".to_string(), "preallocate".to_string());
        r
    };

    // What fits is created.
    let small = common::create_ok(&mut c, preallocated("fits", 8 * MIB)).await;
    let image_sizes = || {
        std::fs::read_dir(d.data_dir().join("images"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .collect::<Vec<_>>()
    };
    assert_eq!(image_sizes(), vec![8 << 20]);

    // Fill the filesystem up to about 3 MiB free.
    let filler = std::fs::File::create(d.data_dir().join("filler")).unwrap();
    let st = rustix::fs::statvfs(d.data_dir()).unwrap();
    let free = st.f_bavail * st.f_frsize;
    rustix::fs::fallocate(
        &filler,
        rustix::fs::FallocateFlags::empty(),
        0,
        free.saturating_sub(3 << 20),
    )
    .unwrap();
    filler.sync_all().unwrap();

    // Smaller than the filesystem but more than is free: RESOURCE_EXHAUSTED, nothing left.
    // (Larger than the whole filesystem is OUT_OF_RANGE, covered by tests/capacity.rs.)
    let before = tree(&d.data_dir());
    let status = c
        .create_volume(preallocated("too-big", 8 * MIB))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(
        tree(&d.data_dir()),
        before,
        "a failed create left something"
    );

    // Growing past the free space fails the same way and leaves the image's size alone.
    let status = c
        .controller_expand_volume(proto::ControllerExpandVolumeRequest {
            volume_id: small.volume_id.clone(),
            capacity_range: Some(proto::CapacityRange {
                required_bytes: 16 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(
        image_sizes(),
        vec![8 << 20],
        "a failed expand changed the image"
    );

    // The store is unharmed: listing, deleting and creating again work.
    let listed = c
        .list_volumes(proto::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.entries.len(), 1);
    c.delete_volume(proto::DeleteVolumeRequest {
        volume_id: small.volume_id,
        ..Default::default()
    })
    .await
    .unwrap();
    std::fs::remove_file(d.data_dir().join("filler")).unwrap();
    c.create_volume(preallocated("after", 8 * MIB))
        .await
        .unwrap();
}

/// Non-zero, incompressible-enough bytes (so no filesystem stores them as holes).
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8 | 1)
        .collect()
}

fn snapshot_request(name: &str, source: &str) -> proto::CreateSnapshotRequest {
    proto::CreateSnapshotRequest {
        name: name.into(),
        source_volume_id: source.into(),
        ..Default::default()
    }
}

/// A CreateVolume request restoring `snapshot` as a `kind` volume of `bytes`.
fn restore_request(
    name: &str,
    kind: Kind,
    bytes: i64,
    snapshot: &str,
) -> proto::CreateVolumeRequest {
    let mut r = create_request(name, kind, bytes);
    r.volume_content_source = Some(proto::VolumeContentSource {
        r#type: Some(proto::volume_content_source::Type::Snapshot(
            proto::volume_content_source::SnapshotSource {
                snapshot_id: snapshot.into(),
            },
        )),
    });
    r
}

async fn snapshot_names(c: &mut ControllerClient<Channel>) -> Vec<String> {
    let mut ids: Vec<String> = c
        .list_snapshots(proto::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.snapshot.unwrap().snapshot_id)
        .collect();
    ids.sort();
    ids
}

async fn volume_ids(c: &mut ControllerClient<Channel>) -> Vec<String> {
    let mut ids: Vec<String> = c
        .list_volumes(proto::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.volume.unwrap().volume_id)
        .collect();
    ids.sort();
    ids
}

/// Snapshots and restores on a full data filesystem (48 MiB ext4, so every copy is a full
/// copy): CreateSnapshot of a directory volume and of a raw block loop volume holding 6 MiB
/// each, and a restore of an earlier snapshot, fail with RESOURCE_EXHAUSTED and leave no
/// snapshot storage, temporary copy, image or record. Once there is room the same requests
/// succeed and the copies hold the sources' data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_data_filesystem_fails_snapshots_and_restores_cleanly() {
    skip_unless_ready!(skip_reason());
    let mut tiny = None;
    let d = tokio::task::block_in_place(|| {
        Driver::start_on(|data| tiny = Some(TinyFs::mount(data, 48)))
    });
    let _tiny = tiny.unwrap();
    let mut c = d.controller().await;
    let payload_len = 6 << 20;

    // Sources with 6 MiB of data each, written into their storage while unpublished.
    let dir_src = common::create_ok(&mut c, create_request("dir-src", Kind::Dir, 8 * MIB))
        .await
        .volume_id;
    let dir_payload = pattern(payload_len, 1);
    write_block(
        &d.data_dir().join("volumes").join(&dir_src).join("payload"),
        &dir_payload,
    );
    let block_src = common::create_ok(&mut c, create_request("block-src", Kind::Block, 8 * MIB))
        .await
        .volume_id;
    let images: Vec<PathBuf> = std::fs::read_dir(d.data_dir().join("images"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(images.len(), 1, "{images:?}");
    let block_payload = pattern(payload_len, 2);
    write_block(&images[0], &block_payload);
    // One snapshot taken while there is room, to restore from later.
    let early = c
        .create_snapshot(snapshot_request("early", &dir_src))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(early.ready_to_use);

    // Fill the filesystem up to about 3 MiB free: less than any of the copies below needs.
    let filler = std::fs::File::create(d.data_dir().join("filler")).unwrap();
    let st = rustix::fs::statvfs(d.data_dir()).unwrap();
    let free = st.f_bavail * st.f_frsize;
    rustix::fs::fallocate(
        &filler,
        rustix::fs::FallocateFlags::empty(),
        0,
        free.saturating_sub(3 << 20),
    )
    .unwrap();
    filler.sync_all().unwrap();

    let before = tree(&d.data_dir());
    let snapshots_before = snapshot_names(&mut c).await;
    let volumes_before = volume_ids(&mut c).await;
    assert_eq!(snapshots_before, vec![early.snapshot_id.clone()]);
    for (name, source) in [("dir-full", &dir_src), ("block-full", &block_src)] {
        let status = c
            .create_snapshot(snapshot_request(name, source))
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::ResourceExhausted,
            "snapshot {name}: {status:?}"
        );
        assert_eq!(
            tree(&d.data_dir()),
            before,
            "a failed snapshot {name} left something"
        );
        assert_eq!(snapshot_names(&mut c).await, snapshots_before);
    }
    let status = c
        .create_volume(restore_request(
            "restored",
            Kind::Dir,
            8 * MIB,
            &early.snapshot_id,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "restore: {status:?}"
    );
    assert_eq!(
        tree(&d.data_dir()),
        before,
        "a failed restore left something"
    );
    assert_eq!(volume_ids(&mut c).await, volumes_before);

    // The store and the driver are fine: with room again the same requests succeed.
    drop(filler);
    std::fs::remove_file(d.data_dir().join("filler")).unwrap();
    for (name, source) in [("dir-full", &dir_src), ("block-full", &block_src)] {
        let snap = c
            .create_snapshot(snapshot_request(name, source))
            .await
            .unwrap_or_else(|e| panic!("snapshot {name} with room: {e:?}"))
            .into_inner()
            .snapshot
            .unwrap();
        assert!(snap.ready_to_use, "{name}");
    }
    assert_eq!(snapshot_names(&mut c).await.len(), 3);
    let restored = common::create_ok(
        &mut c,
        restore_request("restored", Kind::Dir, 8 * MIB, &early.snapshot_id),
    )
    .await
    .volume_id;
    let copy = std::fs::read(d.data_dir().join("volumes").join(&restored).join("payload")).unwrap();
    assert!(
        copy == dir_payload,
        "the restore does not hold the snapshot's data"
    );
}

/// A data directory that turned read-only (e.g. the filesystem remounted ro after errors):
/// creates fail with an error, not a hang or a crash, and nothing is recorded; once writable
/// again, the same request succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_data_directory_fails_creates_and_records_nothing() {
    skip_unless_ready!(skip_reason());
    let d = tokio::task::block_in_place(|| Driver::start_on(|_| {}));
    let data = d.data_dir();
    // A read-only bind of the data directory over itself, like a remount after I/O errors.
    rustix::mount::mount_bind(&data, &data).unwrap();
    rustix::mount::mount_remount(
        &data,
        rustix::mount::MountFlags::BIND | rustix::mount::MountFlags::RDONLY,
        "",
    )
    .unwrap();
    let mut c = d.controller().await;
    for kind in [Kind::Dir, Kind::Ext4] {
        let status = c
            .create_volume(create_request(&format!("ro-{kind:?}"), kind, 16 * MIB))
            .await
            .unwrap_err();
        assert!(
            !matches!(status.code(), Code::Ok | Code::InvalidArgument),
            "{kind:?}: {status:?}"
        );
    }
    let listed = c
        .list_volumes(proto::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.entries.is_empty(), "{listed:?}");
    rustix::mount::unmount(&data, rustix::mount::UnmountFlags::empty()).unwrap();
    for kind in [Kind::Dir, Kind::Ext4] {
        c.create_volume(create_request(&format!("ro-{kind:?}"), kind, 16 * MIB))
            .await
            .unwrap_or_else(|e| panic!("{kind:?} after the data dir is writable again: {e:?}"));
    }
}

/// The data directory vanishes under a running driver (an unmounted disk, an operator's
/// mistake): calls fail with an error instead of recreating it somewhere unexpected, and the
/// driver keeps serving once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_data_directory_fails_calls_and_recovers() {
    skip_unless_ready!(skip_reason());
    let d = tokio::task::block_in_place(Driver::start);
    let mut c = d.controller().await;
    let kept = common::create_ok(&mut c, create_request("kept", Kind::Dir, MIB)).await;
    let aside = d.dir.path().join("data-aside");
    std::fs::rename(d.data_dir(), &aside).unwrap();
    for kind in [Kind::Dir, Kind::Ext4] {
        let status = c
            .create_volume(create_request(&format!("gone-{kind:?}"), kind, 16 * MIB))
            .await
            .unwrap_err();
        assert!(
            !matches!(status.code(), Code::Ok | Code::InvalidArgument),
            "{kind:?}: {status:?}"
        );
    }
    assert!(
        !d.data_dir().exists(),
        "the driver recreated the data directory"
    );
    std::fs::rename(&aside, d.data_dir()).unwrap();
    let listed = c
        .list_volumes(proto::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<String> = listed
        .entries
        .into_iter()
        .map(|e| e.volume.unwrap().volume_id)
        .collect();
    assert_eq!(ids, vec![kept.volume_id]);
    c.create_volume(create_request("back", Kind::Dir, MIB))
        .await
        .unwrap();
}

/// A loop image whose filesystem was overwritten: staging fails with an error, nothing stays
/// mounted at the staging path, and deleting the volume leaves no loop device behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_image_fails_staging_and_leaves_no_mount_or_device() {
    skip_unless_ready!(skip_reason());
    let d = tokio::task::block_in_place(Driver::start);
    let mut c = d.controller().await;
    let mut node = d.node().await;
    let id = common::create_ok(&mut c, create_request("corrupt", Kind::Ext4, 16 * MIB))
        .await
        .volume_id;
    let image = std::fs::read_dir(d.data_dir().join("images"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    {
        // Zero the first MiB: the ext4 superblock (at 1 KiB) and group descriptors.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.write_all(&vec![0u8; 1 << 20]).unwrap();
        f.sync_all().unwrap();
    }
    let staging = d.target("corrupt-staging");
    let status = node
        .node_stage_volume(proto::NodeStageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.clone(),
            volume_capability: Some(capability(Kind::Ext4)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_ne!(status.code(), Code::Ok, "{status:?}");
    assert!(!common::is_mounted(Path::new(&staging)));
    // The failed stage is not recorded: unstage finds nothing to do, and delete works.
    node.node_unstage_volume(proto::NodeUnstageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.clone(),
    })
    .await
    .unwrap();
    c.delete_volume(proto::DeleteVolumeRequest {
        volume_id: id,
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(!image.exists());
    tokio::task::block_in_place(|| {
        eventually("the corrupted image's loop device to go", || {
            common::loop_devices_under(d.dir.path()).is_empty()
        })
    });
}

/// A driver whose store holds one volume ("kept"), stopped; and the store file's path.
fn stopped_driver_with_a_volume() -> (Driver, PathBuf) {
    let mut d = Driver::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        d.controller()
            .await
            .create_volume(create_request("kept", Kind::Dir, MIB))
            .await
            .unwrap();
    });
    assert!(d.stop().success());
    let file = d.state_dir().join(k8scsi::store::STORE_FILE);
    assert!(file.is_file(), "no store file at {}", file.display());
    (d, file)
}

/// Sets (or with `None` removes) the store's schema version behind the driver's back.
fn set_schema_version(file: &Path, version: Option<u64>) {
    let db = redb::Database::open(file).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let meta: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
        let mut table = txn.open_table(meta).unwrap();
        match version {
            Some(v) => {
                table.insert("schema_version", v).unwrap();
            }
            None => {
                table.remove("schema_version").unwrap();
            }
        }
    }
    txn.commit().unwrap();
}

/// Starts the driver's command on its directories expecting it to refuse the store: it exits
/// unsuccessfully and the file is byte-for-byte what it was. Returns its stderr.
fn refused_untouched(d: &Driver, file: &Path) -> String {
    let before = std::fs::read(file).unwrap();
    let out = d
        .command()
        .stdout(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the server started: {stderr}");
    assert!(
        std::fs::read(file).unwrap() == before,
        "the refused store file was modified"
    );
    stderr
}

/// A store written by a newer k8scsi (a higher schema version): the server refuses to start,
/// says why, and does not modify the file.
#[test]
fn a_store_from_a_newer_version_is_refused_untouched() {
    let (d, file) = stopped_driver_with_a_volume();
    set_schema_version(&file, Some(k8scsi::store::SCHEMA_VERSION + 1));
    let stderr = refused_untouched(&d, &file);
    assert!(stderr.contains("schema version"), "{stderr}");
}

/// A store from an older schema version this build has no migration for (schema 1 is the
/// first, so version 0): refused untouched, and the message names both versions and what to
/// do. A store holding records but no version at all is refused the same way rather than
/// stamped with the current version.
#[test]
fn a_store_from_an_older_version_without_a_migration_is_refused_untouched() {
    let current = k8scsi::store::SCHEMA_VERSION;
    let (d, file) = stopped_driver_with_a_volume();
    set_schema_version(&file, Some(current - 1));
    let stderr = refused_untouched(&d, &file);
    for needle in [
        format!("schema version {}", current - 1),
        format!("schema version {current}"),
        "no migration".to_string(),
        "left unchanged".to_string(),
        "release".to_string(),
    ] {
        assert!(
            stderr.contains(&needle),
            "{needle:?} missing from: {stderr}"
        );
    }

    set_schema_version(&file, None);
    let stderr = refused_untouched(&d, &file);
    assert!(stderr.contains("no schema version"), "{stderr}");

    // Put back, the same file serves again with its volume.
    set_schema_version(&file, Some(current));
    let mut d = d;
    d.restart();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listed = rt.block_on(async {
        d.controller()
            .await
            .list_volumes(proto::ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .entries
    });
    assert_eq!(listed.len(), 1);
}

/// A store file that exists but was never initialised (the very first start crashed after
/// creating it: zero bytes, or a database with no tables): the server initialises it normally,
/// and what it then records survives a restart.
#[test]
fn a_store_file_without_a_schema_is_initialised_normally() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    for how in ["empty file", "database without tables"] {
        // A driver's directories, its store file replaced by what the crash left.
        let mut d = Driver::start();
        assert!(d.stop().success());
        let file = d.state_dir().join(k8scsi::store::STORE_FILE);
        std::fs::remove_file(&file).unwrap();
        match how {
            "empty file" => drop(std::fs::File::create(&file).unwrap()),
            _ => drop(redb::Database::create(&file).unwrap()),
        }
        d.restart();
        rt.block_on(async {
            d.controller()
                .await
                .create_volume(create_request("first", Kind::Dir, MIB))
                .await
                .unwrap_or_else(|e| panic!("{how}: {e:?}"));
        });
        d.restart();
        let listed = rt.block_on(async {
            d.controller()
                .await
                .list_volumes(proto::ListVolumesRequest::default())
                .await
                .unwrap()
                .into_inner()
                .entries
        });
        assert_eq!(listed.len(), 1, "{how}");
        drop(d);
    }
}
