//! The shared-filesystem backend end to end. This kernel has no NFS client, so the "share" is a
//! real ext4 filesystem on a loop device, named by `source` + `fsType` exactly as an NFS export
//! would be named by `server` + `share`: every driver process mounts it itself, like nodes
//! mounting one export. Two node plugins with different node IDs publish one volume read-write
//! at once and write from both; subDir templates, escape and injection attempts, onDelete
//! modes, and a controller on a fresh state directory deleting an earlier controller's volume
//! are checked on the filesystem itself. Needs root, losetup and mkfs.ext4; skips otherwise.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use common::Driver;
use common::share::{Share, skip_reason};
use k8scsi::backend::shared::spec::{ShareRef, volume_id};
use k8scsi::client::mount_capability;
use k8scsi::csi::proto::volume_capability::access_mode::Mode;
use k8scsi::csi::proto::{self, VolumeCapability};
use tonic::Code;
use tonic::transport::Channel;

type Controller = proto::controller_client::ControllerClient<Channel>;
type Node = proto::node_client::NodeClient<Channel>;

fn metadata(namespace: &str, pvc: &str, pv: &str) -> [(&'static str, String); 3] {
    [
        ("csi.storage.k8s.io/pvc/namespace", namespace.to_string()),
        ("csi.storage.k8s.io/pvc/name", pvc.to_string()),
        ("csi.storage.k8s.io/pv/name", pv.to_string()),
    ]
}

async fn create(
    c: &mut Controller,
    name: &str,
    params: HashMap<String, String>,
    capability: VolumeCapability,
) -> Result<proto::Volume, tonic::Status> {
    c.create_volume(proto::CreateVolumeRequest {
        name: name.to_string(),
        capacity_range: Some(proto::CapacityRange {
            required_bytes: 16 << 20,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![capability],
        parameters: params,
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner().volume.unwrap())
}

fn rwx() -> VolumeCapability {
    mount_capability(Mode::MultiNodeMultiWriter, vec![])
}

async fn stage_and_publish(
    n: &mut Node,
    d: &Driver,
    id: &str,
    capability: VolumeCapability,
    readonly: bool,
) -> (String, String) {
    let staging = d.target(&format!("stage-{}", d.node_id));
    let target = d.target(&format!("pod-{}-{readonly}", d.node_id));
    n.node_stage_volume(proto::NodeStageVolumeRequest {
        volume_id: id.to_string(),
        staging_target_path: staging.clone(),
        volume_capability: Some(capability.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    n.node_publish_volume(proto::NodePublishVolumeRequest {
        volume_id: id.to_string(),
        staging_target_path: staging.clone(),
        target_path: target.clone(),
        volume_capability: Some(capability),
        readonly,
        ..Default::default()
    })
    .await
    .unwrap();
    (staging, target)
}

async fn unpublish_and_unstage(n: &mut Node, id: &str, staging: &str, target: &str) {
    n.node_unpublish_volume(proto::NodeUnpublishVolumeRequest {
        volume_id: id.to_string(),
        target_path: target.to_string(),
    })
    .await
    .unwrap();
    n.node_unstage_volume(proto::NodeUnstageVolumeRequest {
        volume_id: id.to_string(),
        staging_target_path: staging.to_string(),
    })
    .await
    .unwrap();
    assert!(!common::is_mounted(Path::new(target)));
    assert!(!common::is_mounted(Path::new(staging)));
}

async fn delete(c: &mut Controller, id: &str) {
    c.delete_volume(proto::DeleteVolumeRequest {
        volume_id: id.to_string(),
        ..Default::default()
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn two_nodes_publish_one_volume_read_write_and_both_write() {
    skip_unless_ready!(skip_reason());
    let share = Share::new();
    let controller = Driver::start_as("controller", &["--mode", "controller"]);
    let node_a = Driver::start_as("node-a", &["--mode", "node"]);
    let node_b = Driver::start_as("node-b", &["--mode", "node"]);
    let mut c = controller.controller().await;

    let mut params = share.params(&[("subDir", "${pvc.metadata.namespace}/${pvc.metadata.name}")]);
    params.extend(
        metadata("shop", "data-web-0", "pvc-1234")
            .into_iter()
            .map(|(k, v)| (k.to_string(), v)),
    );
    let volume = create(&mut c, "pvc-1234", params, rwx()).await.unwrap();
    assert!(volume.volume_id.starts_with("shared-") && volume.volume_id.len() <= 128);
    assert!(
        volume.accessible_topology.is_empty(),
        "shared volumes are reachable from every node: {:?}",
        volume.accessible_topology
    );
    assert_eq!(
        volume
            .volume_context
            .get("k8scsi.io/capacity-enforcement")
            .map(String::as_str),
        Some("none")
    );
    let dir = share.view().join("shop/data-web-0");
    assert!(dir.is_dir(), "the template rendered to shop/data-web-0");
    assert_eq!(share.root_entries(), [".k8scsi", "shop"]);

    let got = c
        .controller_get_volume(proto::ControllerGetVolumeRequest {
            volume_id: volume.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let message = got.status.unwrap().volume_condition.unwrap().message;
    assert!(message.contains("recorded, not enforced"), "{message}");

    let id = volume.volume_id.clone();
    let mut na = node_a.node().await;
    let mut nb = node_b.node().await;
    let (stage_a, target_a) = stage_and_publish(&mut na, &node_a, &id, rwx(), false).await;
    let (stage_b, target_b) = stage_and_publish(&mut nb, &node_b, &id, rwx(), false).await;

    // Both nodes write at the same time, each its own file and both one shared file.
    std::thread::scope(|s| {
        for (target, who) in [(&target_a, "a"), (&target_b, "b")] {
            s.spawn(move || {
                use std::io::Write;
                let path = Path::new(target);
                std::fs::write(path.join(format!("from-{who}")), who.repeat(1000)).unwrap();
                let mut log = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path.join("log"))
                    .unwrap();
                for i in 0..100 {
                    writeln!(log, "{who} {i}").unwrap();
                }
                log.sync_all().unwrap();
            });
        }
    });
    for target in [&target_a, &target_b] {
        let path = Path::new(target);
        assert_eq!(
            std::fs::read_to_string(path.join("from-a")).unwrap(),
            "a".repeat(1000)
        );
        assert_eq!(
            std::fs::read_to_string(path.join("from-b")).unwrap(),
            "b".repeat(1000)
        );
        let log = std::fs::read_to_string(path.join("log")).unwrap();
        assert_eq!(
            log.lines().count(),
            200,
            "appends from both nodes interleave, none lost"
        );
    }
    assert!(dir.join("from-a").exists() && dir.join("from-b").exists());

    // A reader-only publication on node B is read-only; node A keeps writing.
    let rox = mount_capability(Mode::MultiNodeReaderOnly, vec![]);
    let ro_target = node_b.target("pod-reader");
    nb.node_publish_volume(proto::NodePublishVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: stage_b.clone(),
        target_path: ro_target.clone(),
        volume_capability: Some(rox),
        readonly: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let err = std::fs::write(Path::new(&ro_target).join("nope"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(30), "EROFS expected, got {err:?}");
    assert_eq!(
        std::fs::read_to_string(Path::new(&ro_target).join("from-a")).unwrap(),
        "a".repeat(1000)
    );
    std::fs::write(Path::new(&target_a).join("still-writable"), b"x").unwrap();

    // Stats on a node see the volume's own usage.
    let stats = nb
        .node_get_volume_stats(proto::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target_b.clone(),
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
    assert!(bytes.used > 2000, "{bytes:?}");

    nb.node_unpublish_volume(proto::NodeUnpublishVolumeRequest {
        volume_id: id.clone(),
        target_path: ro_target.clone(),
    })
    .await
    .unwrap();
    unpublish_and_unstage(&mut na, &id, &stage_a, &target_a).await;
    unpublish_and_unstage(&mut nb, &id, &stage_b, &target_b).await;
    delete(&mut c, &id).await;
    assert!(!dir.exists(), "onDelete defaults to delete");
    assert!(
        share.view().join("shop").is_dir(),
        "only the volume's own directory is removed"
    );
    // No driver keeps the share mounted once it is done with it.
    for d in [&controller, &node_a, &node_b] {
        let table = k8scsi::mount::mountinfo::read().unwrap();
        assert!(
            !table
                .iter()
                .any(|e| e.mount_point.starts_with(d.data_dir())),
            "{} still has a share mounted",
            d.node_id
        );
    }
}

#[tokio::test]
async fn escapes_and_injections_are_refused_and_change_nothing() {
    skip_unless_ready!(skip_reason());
    let share = Share::new();
    let d = Driver::start();
    let mut c = d.controller().await;
    let mut cases: Vec<(String, HashMap<String, String>, Vec<String>)> = Vec::new();
    for sub_dir in [
        "../escape",
        "a/../../escape",
        "/etc",
        "${env.HOME}",
        "${pvc.metadata.name",
        ".k8scsi/volumes",
        "a//b",
        "a b",
    ] {
        cases.push((
            format!("subDir {sub_dir:?}"),
            share.params(&[("subDir", sub_dir)]),
            vec![],
        ));
    }
    for pvc_name in ["..", "a/b", ".hidden"] {
        let mut p = share.params(&[("subDir", "${pvc.metadata.name}")]);
        for (k, v) in metadata("shop", pvc_name, "pv-x") {
            p.insert(k.to_string(), v);
        }
        cases.push((format!("pvc name {pvc_name:?}"), p, vec![]));
    }
    let mut nul = share.params(&[]);
    nul.insert("subDir".into(), "a\0b".into());
    cases.push(("NUL in subDir".into(), nul, vec![]));
    for (k, v) in [
        ("source", "/dev/../etc"),
        ("source", "relative/dir"),
        ("source", "-oloop"),
        ("fsType", "proc"),
        ("onDelete", "shred"),
        ("mountPermissions", "4777"),
        ("enforceCapacity", "true"),
        ("server", "nfs.example.com"),
    ] {
        let mut p = share.params(&[]);
        p.insert(k.to_string(), v.to_string());
        cases.push((format!("{k}={v:?}"), p, vec![]));
    }
    for flags in [
        vec!["nfsvers=4.1,bind".to_string()],
        vec!["bind".to_string()],
        vec!["remount".to_string()],
        vec!["x-mount.mkdir".to_string()],
        vec!["offset=1048576".to_string()],
        vec!["suid".to_string()],
    ] {
        cases.push((format!("mount flags {flags:?}"), share.params(&[]), flags));
    }
    for (what, params, flags) in cases {
        let err = create(
            &mut c,
            "pvc-evil",
            params,
            mount_capability(Mode::MultiNodeMultiWriter, flags),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
    }
    assert!(
        share.root_entries().is_empty(),
        "{:?}",
        share.root_entries()
    );

    // A well-formed ID naming a share without our markers is "not found" on the node, and
    // looking for the volume writes nothing there.
    let empty = tempfile::tempdir().unwrap();
    let forged = volume_id(
        "pvc-forged",
        &ShareRef {
            fs_type: "none".into(),
            source: empty.path().to_string_lossy().into_owned(),
            options: vec![],
        },
    )
    .unwrap();
    let mut n = d.node().await;
    let err = n
        .node_stage_volume(proto::NodeStageVolumeRequest {
            volume_id: forged.clone(),
            staging_target_path: d.target("stage"),
            volume_capability: Some(rwx()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    delete(&mut c, &forged).await;
    assert!(std::fs::read_dir(empty.path()).unwrap().next().is_none());
    // A tampered ID (bytes appended to the share) is not one of ours.
    let volume = create(&mut c, "pvc-ok", share.params(&[]), rwx())
        .await
        .unwrap();
    let err = c
        .controller_get_volume(proto::ControllerGetVolumeRequest {
            volume_id: format!("{}x", volume.volume_id),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    delete(&mut c, &volume.volume_id).await;
}

#[tokio::test]
async fn templates_collisions_and_on_delete_modes() {
    skip_unless_ready!(skip_reason());
    let share = Share::new();
    let d = Driver::start();
    let mut c = d.controller().await;
    let with_meta = |extra: &[(&str, &str)], pvc: &str, pv: &str| {
        let mut p = share.params(extra);
        for (k, v) in metadata("team", pvc, pv) {
            p.insert(k.to_string(), v);
        }
        p
    };

    let retained = create(
        &mut c,
        "pv-r",
        with_meta(
            &[
                ("subDir", "keep/${pv.metadata.name}"),
                ("onDelete", "retain"),
            ],
            "r",
            "pv-r",
        ),
        rwx(),
    )
    .await
    .unwrap();
    let archived = create(
        &mut c,
        "pv-a",
        with_meta(
            &[
                ("subDir", "${pvc.metadata.namespace}-${pvc.metadata.name}"),
                ("onDelete", "archive"),
                ("mountPermissions", "0777"),
            ],
            "a",
            "pv-a",
        ),
        rwx(),
    )
    .await
    .unwrap();
    let deleted = create(&mut c, "pv-d", with_meta(&[], "d", "pv-d"), rwx())
        .await
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(share.view().join("team-a"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o777
    );
    for dir in ["keep/pv-r", "team-a", "pv-d"] {
        std::fs::write(share.view().join(dir).join("data"), dir).unwrap();
    }

    // Another volume whose template lands on (or around) an existing directory is refused.
    for (name, sub_dir) in [
        ("pv-x", "keep/pv-r"),
        ("pv-y", "keep"),
        ("pv-z", "pv-d/inner"),
    ] {
        let err = create(
            &mut c,
            name,
            with_meta(&[("subDir", sub_dir)], "x", name),
            rwx(),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{name}: {err:?}");
    }
    assert!(!share.view().join("pv-d/inner").exists());

    // Growing is recorded (nothing to do on the nodes), but not past the share's free space.
    let grown = c
        .controller_expand_volume(proto::ControllerExpandVolumeRequest {
            volume_id: deleted.volume_id.clone(),
            capacity_range: Some(proto::CapacityRange {
                required_bytes: 32 << 20,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 32 << 20);
    assert!(!grown.node_expansion_required);
    let err = c
        .controller_expand_volume(proto::ControllerExpandVolumeRequest {
            volume_id: deleted.volume_id.clone(),
            capacity_range: Some(proto::CapacityRange {
                required_bytes: 1 << 40,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    // 1 TiB is more than the whole 2 GiB share: it can never fit.
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");

    for v in [&retained, &archived, &deleted] {
        delete(&mut c, &v.volume_id).await;
        delete(&mut c, &v.volume_id).await;
    }
    assert_eq!(
        std::fs::read_to_string(share.view().join("keep/pv-r/data")).unwrap(),
        "keep/pv-r"
    );
    assert!(!share.view().join("team-a").exists());
    let archive: Vec<String> = share
        .root_entries()
        .into_iter()
        .filter(|n| n.starts_with("archived-team-a-"))
        .collect();
    assert_eq!(archive.len(), 1, "{:?}", share.root_entries());
    assert_eq!(
        std::fs::read_to_string(share.view().join(&archive[0]).join("data")).unwrap(),
        "team-a"
    );
    assert!(!share.view().join("pv-d").exists());
    assert!(
        std::fs::read_dir(share.view().join(".k8scsi/volumes"))
            .unwrap()
            .next()
            .is_none(),
        "every marker is gone"
    );
}

#[tokio::test]
async fn a_controller_on_a_fresh_state_dir_deletes_an_earlier_volume() {
    skip_unless_ready!(skip_reason());
    let share = Share::new();
    let mut first = Driver::start();
    let mut c = first.controller().await;
    let volume = create(
        &mut c,
        "pvc-old",
        share.params(&[("subDir", "old/pvc-old")]),
        rwx(),
    )
    .await
    .unwrap();
    std::fs::write(share.view().join("old/pvc-old/data"), b"x").unwrap();
    drop(c);
    first.kill();

    // Another node, another (empty) state directory: only the volume ID is known.
    let second = Driver::start_as("node-2", &["--mode", "controller"]);
    let mut c = second.controller().await;
    // Retrying the CreateVolume adopts the existing directory instead of failing.
    let again = create(
        &mut c,
        "pvc-old",
        share.params(&[("subDir", "old/pvc-old")]),
        rwx(),
    )
    .await
    .unwrap();
    assert_eq!(again.volume_id, volume.volume_id);
    assert!(share.view().join("old/pvc-old/data").exists());
    delete(&mut c, &volume.volume_id).await;
    assert!(!share.view().join("old/pvc-old").exists());
    assert!(share.view().join("old").is_dir());

    // And a third controller, which never heard of the volume, deletes nothing more.
    let third = Driver::start_as("node-3", &["--mode", "controller"]);
    let mut c = third.controller().await;
    delete(&mut c, &volume.volume_id).await;
    assert_eq!(share.root_entries(), [".k8scsi", "old"]);
}

#[tokio::test]
async fn a_share_whose_mount_hangs_times_out_and_other_shares_keep_working() {
    skip_unless_ready!(skip_reason());
    let share = Share::new();
    // A mount program that hangs for one "server" (like mount.nfs against a dead server) and
    // runs the real mount(8) for everything else.
    let tools = tempfile::tempdir().unwrap();
    let dead = tools.path().join("dead-server");
    std::fs::create_dir(&dead).unwrap();
    let wrapper = tools.path().join("mount-wrapper");
    std::fs::write(
        &wrapper,
        "#!/bin/sh\nfor a in \"$@\"; do case \"$a\" in */dead-server) exec sleep 600;; esac; done\nexec mount \"$@\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = Driver::start_with(&[
        "--share-timeout",
        // Long enough for a healthy mount on a loaded machine, short for the test.
        "8s",
        "--mount-program",
        wrapper.to_str().unwrap(),
    ]);

    let mut dead_params = share.params(&[]);
    dead_params.insert("source".into(), dead.to_string_lossy().into_owned());
    dead_params.insert("fsType".into(), "none".into());
    let mut c1 = d.controller().await;
    let hanging =
        tokio::spawn(async move { create(&mut c1, "pvc-dead", dead_params, rwx()).await });

    // Meanwhile the driver answers, and volumes on the healthy share are created and deleted.
    let mut c = d.controller().await;
    let probe = d
        .identity()
        .await
        .probe(proto::ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true));
    let healthy = create(&mut c, "pvc-alive", share.params(&[]), rwx())
        .await
        .unwrap();
    assert!(share.view().join("pvc-alive").is_dir());

    let err = hanging.await.unwrap().unwrap_err();
    assert!(
        err.message().contains("did not finish within"),
        "the hung mount is reported: {err:?}"
    );
    assert!(std::fs::read_dir(&dead).unwrap().next().is_none());
    delete(&mut c, &healthy.volume_id).await;
    assert!(!share.view().join("pvc-alive").exists());
    let table = k8scsi::mount::mountinfo::read().unwrap();
    assert!(
        !table
            .iter()
            .any(|e| e.mount_point.starts_with(d.data_dir())),
        "no share mount is left behind"
    );
}

#[test]
fn copies_within_a_share_use_reflinks_where_the_filesystem_has_them() {
    use k8scsi::backend::shared::SharedBackend;
    use k8scsi::backend::{Backend, VolumeOptions};
    use std::io::{Seek, SeekFrom, Write};
    skip_unless_ready!(skip_reason());
    skip_unless_ready!(
        Command::new("mkfs.btrfs")
            .arg("--version")
            .output()
            .is_err()
            .then_some("mkfs.btrfs is not installed")
    );
    for fs in ["btrfs", "ext4"] {
        let share = Share::formatted(fs);
        let data = tempfile::tempdir().unwrap();
        let backend =
            SharedBackend::new(data.path(), std::time::Duration::from_secs(30), "mount").unwrap();
        let params: std::collections::BTreeMap<String, String> =
            share.params(&[]).into_iter().collect();
        let mut ids = Vec::new();
        for name in ["pv-src", "pv-dst"] {
            let id = backend.volume_id(name, &params, &[]).unwrap();
            let options = VolumeOptions {
                name: name.to_string(),
                parameters: params.clone(),
                ..Default::default()
            };
            backend.create(&id, &options).unwrap();
            ids.push(id);
        }
        let src = share.view().join("pv-src");
        let payload: Vec<u8> = (0..4u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(src.join("data"), &payload).unwrap();
        let mut sparse = std::fs::File::create(src.join("sparse")).unwrap();
        sparse.seek(SeekFrom::Start(100 << 20)).unwrap();
        sparse.write_all(b"end").unwrap();
        sparse.sync_all().unwrap();
        std::fs::create_dir(src.join("dir")).unwrap();
        std::os::unix::fs::symlink("../data", src.join("dir/link")).unwrap();

        let stats = backend.copy_volume(&ids[0], &ids[1]).unwrap();
        println!("{fs}: {stats:?}");
        assert_eq!((stats.files, stats.dirs, stats.symlinks), (2, 1, 1));
        if fs == "btrfs" {
            assert_eq!(stats.reflinked, 2, "btrfs clones files");
            assert_eq!(stats.bytes_copied, 0);
        } else {
            assert_eq!(stats.reflinked, 0, "ext4 has no reflinks");
            // The data, not the 100 MiB hole.
            assert!(
                stats.bytes_copied >= 4 << 20 && stats.bytes_copied < 5 << 20,
                "{stats:?}"
            );
        }
        let dst = share.view().join("pv-dst");
        assert!(std::fs::read(dst.join("data")).unwrap() == payload);
        assert_eq!(
            std::fs::metadata(dst.join("sparse")).unwrap().len(),
            (100 << 20) + 3
        );
        assert_eq!(
            std::fs::read_link(dst.join("dir/link")).unwrap(),
            Path::new("../data")
        );
        for id in &ids {
            backend.delete(id).unwrap();
        }
        assert!(!src.exists() && !dst.exists());
    }
}

/// SHA-256 of every regular file below `root` (by relative path), plus the targets of
/// symlinks, so two trees compare equal only with the same content.
fn tree_digest(root: &Path) -> std::collections::BTreeMap<String, String> {
    use sha2::{Digest, Sha256};
    let mut out = std::collections::BTreeMap::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                pending.push(path);
            } else if meta.is_symlink() {
                let target = std::fs::read_link(&path).unwrap();
                out.insert(rel, format!("-> {}", target.display()));
            } else {
                let digest = Sha256::digest(std::fs::read(&path).unwrap());
                out.insert(rel, format!("{digest:x}"));
            }
        }
    }
    out
}

async fn snapshot(c: &mut Controller, name: &str, source: &str) -> proto::Snapshot {
    c.create_snapshot(proto::CreateSnapshotRequest {
        name: name.to_string(),
        source_volume_id: source.to_string(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .snapshot
    .unwrap()
}

async fn create_from(
    c: &mut Controller,
    name: &str,
    params: HashMap<String, String>,
    bytes: i64,
    source: proto::volume_content_source::Type,
) -> Result<proto::Volume, tonic::Status> {
    c.create_volume(proto::CreateVolumeRequest {
        name: name.to_string(),
        capacity_range: Some(proto::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![rwx()],
        parameters: params,
        volume_content_source: Some(proto::VolumeContentSource {
            r#type: Some(source),
        }),
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner().volume.unwrap())
}

fn from_snapshot(id: &str) -> proto::volume_content_source::Type {
    proto::volume_content_source::Type::Snapshot(proto::volume_content_source::SnapshotSource {
        snapshot_id: id.to_string(),
    })
}

fn from_volume(id: &str) -> proto::volume_content_source::Type {
    proto::volume_content_source::Type::Volume(proto::volume_content_source::VolumeSource {
        volume_id: id.to_string(),
    })
}

/// The mechanism a shared snapshot's marker on the share records.
fn recorded_mechanism(share: &Share, snapshot_id: &str) -> String {
    let path = share
        .view()
        .join(".k8scsi/snapshots")
        .join(snapshot_id)
        .join("snapshot.json");
    let marker: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    marker["mechanism"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn snapshots_restores_and_clones_stay_on_the_share_and_survive_the_controller() {
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;
    skip_unless_ready!(skip_reason());
    skip_unless_ready!(
        Command::new("mkfs.btrfs")
            .arg("--version")
            .output()
            .is_err()
            .then_some("mkfs.btrfs is not installed")
    );
    // btrfs shares extents (reflink); ext4 gets the hole-keeping copy.
    for (fs, mechanism) in [("btrfs", "reflink"), ("ext4", "copy")] {
        let share = Share::formatted(fs);
        let mut first = Driver::start();
        let mut c = first.controller().await;
        let src = create(&mut c, "pvc-src", share.params(&[]), rwx())
            .await
            .unwrap();
        let dir = share.view().join("pvc-src");
        let payload: Vec<u8> = (0..3u32 << 20).map(|i| (i * 13 % 251) as u8).collect();
        std::fs::write(dir.join("data"), &payload).unwrap();
        let mut sparse = std::fs::File::create(dir.join("sparse")).unwrap();
        sparse.seek(SeekFrom::Start(64 << 20)).unwrap();
        sparse.write_all(b"end").unwrap();
        sparse.sync_all().unwrap();
        std::fs::create_dir(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/file"), b"nested").unwrap();
        std::os::unix::fs::symlink("../data", dir.join("sub/link")).unwrap();
        let before = tree_digest(&dir);

        let snap = snapshot(&mut c, "snap-1", &src.volume_id).await;
        assert!(snap.ready_to_use);
        assert!(
            snap.snapshot_id.starts_with("snap-shared-"),
            "{}",
            snap.snapshot_id
        );
        assert!(snap.snapshot_id.len() <= 128);
        assert_eq!(snap.size_bytes, 16 << 20);
        assert_eq!(snap.source_volume_id, src.volume_id);
        assert_eq!(
            snapshot(&mut c, "snap-1", &src.volume_id).await.snapshot_id,
            snap.snapshot_id,
            "idempotent"
        );
        assert_eq!(
            recorded_mechanism(&share, &snap.snapshot_id),
            mechanism,
            "{fs}"
        );
        // Written after CreateSnapshot answered: in the volume and its clone, never in the
        // snapshot.
        std::fs::write(dir.join("data"), b"after the snapshot").unwrap();
        std::fs::write(dir.join("later"), b"later").unwrap();
        let after = tree_digest(&dir);
        assert_ne!(before, after);

        // A restore into a larger size records that size.
        let restored = create_from(
            &mut c,
            "pvc-restored",
            share.params(&[]),
            32 << 20,
            from_snapshot(&snap.snapshot_id),
        )
        .await
        .unwrap();
        assert_eq!(restored.capacity_bytes, 32 << 20);
        let restored_dir = share.view().join("pvc-restored");
        assert_eq!(
            tree_digest(&restored_dir),
            before,
            "{fs}: restore = snapshot time"
        );
        assert_eq!(
            std::fs::metadata(restored_dir.join("sparse"))
                .unwrap()
                .len(),
            (64 << 20) + 3
        );
        assert!(
            std::fs::metadata(restored_dir.join("sparse"))
                .unwrap()
                .blocks()
                < 8 << 10,
            "the hole stays a hole"
        );

        let clone = create_from(
            &mut c,
            "pvc-clone",
            share.params(&[]),
            0,
            from_volume(&src.volume_id),
        )
        .await
        .unwrap();
        assert_eq!(clone.capacity_bytes, 16 << 20);
        assert_eq!(tree_digest(&share.view().join("pvc-clone")), after);

        // The source must be on the new volume's share: refused before anything is written.
        let other = tempfile::tempdir().unwrap();
        let mut elsewhere = share.params(&[]);
        elsewhere.insert("source".into(), other.path().to_string_lossy().into_owned());
        elsewhere.insert("fsType".into(), "none".into());
        for source in [
            from_snapshot(&snap.snapshot_id),
            from_volume(&src.volume_id),
        ] {
            let err = create_from(&mut c, "pvc-elsewhere", elsewhere.clone(), 0, source)
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
            assert!(
                err.message().contains("within its source's share"),
                "{err:?}"
            );
        }
        assert!(std::fs::read_dir(other.path()).unwrap().next().is_none());

        // A volume group snapshot of shared volumes is refused: a tree copy cannot be frozen.
        let mut g =
            proto::group_controller_client::GroupControllerClient::new(first.channel().await);
        let err = g
            .create_volume_group_snapshot(proto::CreateVolumeGroupSnapshotRequest {
                name: "group-1".into(),
                source_volume_ids: vec![src.volume_id.clone(), clone.volume_id.clone()],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        drop((c, g));
        first.kill();

        // A controller elsewhere, on an empty state directory, knows only the snapshot ID: it
        // restores from it and deletes it.
        let second = Driver::start_as("node-2", &["--mode", "controller"]);
        let mut c = second.controller().await;
        let again = create_from(
            &mut c,
            "pvc-restored-2",
            share.params(&[]),
            0,
            from_snapshot(&snap.snapshot_id),
        )
        .await
        .unwrap();
        assert_eq!(
            again.capacity_bytes,
            16 << 20,
            "the size recorded on the share"
        );
        assert_eq!(tree_digest(&share.view().join("pvc-restored-2")), before);
        c.delete_snapshot(proto::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        assert!(
            std::fs::read_dir(share.view().join(".k8scsi/snapshots"))
                .unwrap()
                .next()
                .is_none(),
            "the snapshot's directory is gone"
        );
        let err = create_from(
            &mut c,
            "pvc-restored-3",
            share.params(&[]),
            0,
            from_snapshot(&snap.snapshot_id),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
        for id in [
            &src.volume_id,
            &restored.volume_id,
            &clone.volume_id,
            &again.volume_id,
        ] {
            delete(&mut c, id).await;
        }
        assert_eq!(share.root_entries(), [".k8scsi"]);
        drop(c);
        drop(second);
    }
}

/// The share's mount flags are part of a shared volume: a repeated CreateVolume with other
/// flags is ALREADY_EXISTS, not the volume made with the first ones.
#[tokio::test]
async fn a_repeated_create_with_other_mount_flags_already_exists() {
    skip_unless_ready!(skip_reason());
    let share = Share::new();
    let d = Driver::start();
    let mut c = d.controller().await;
    let params = share.params(&[]);
    let first = create(
        &mut c,
        "flags",
        params.clone(),
        mount_capability(Mode::MultiNodeMultiWriter, vec!["noatime".into()]),
    )
    .await
    .unwrap();
    let same = create(
        &mut c,
        "flags",
        params.clone(),
        mount_capability(Mode::MultiNodeMultiWriter, vec!["noatime".into()]),
    )
    .await
    .unwrap();
    assert_eq!(same.volume_id, first.volume_id);
    let err = create(
        &mut c,
        "flags",
        params,
        mount_capability(Mode::MultiNodeMultiWriter, vec!["ro".into()]),
    )
    .await
    .expect_err("other mount flags");
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    delete(&mut c, &first.volume_id).await;
}

#[tokio::test]
async fn stats_of_a_shared_volume_come_from_the_share() {
    skip_unless_ready!(skip_reason());
    let share = Share::new();
    let d = Driver::start();
    let mut c = d.controller().await;
    let mut n = d.node().await;
    // As large as the share allows: its free space, not the volume's size, bounds it.
    let free = {
        let st = rustix::fs::statvfs(share.view()).unwrap();
        (st.f_bavail * st.f_frsize) as i64
    };
    let id = c
        .create_volume(proto::CreateVolumeRequest {
            name: "pvc-stats".to_string(),
            capacity_range: Some(proto::CapacityRange {
                required_bytes: free,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![rwx()],
            parameters: share.params(&[]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    // Something else on the share takes 64 MiB of it.
    {
        use std::io::Write;
        let mut other = std::fs::File::create(share.view().join("other-data")).unwrap();
        let chunk = vec![0x5au8; 1 << 20];
        for _ in 0..64 {
            other.write_all(&chunk).unwrap();
        }
        other.sync_all().unwrap();
    }
    let (staging, target) = stage_and_publish(&mut n, &d, &id, rwx(), false).await;
    let stats = n
        .node_get_volume_stats(proto::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.clone(),
            staging_target_path: staging.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let fs = rustix::fs::statvfs(share.view()).unwrap();
    unpublish_and_unstage(&mut n, &id, &staging, &target).await;
    delete(&mut c, &id).await;
    let usage = |unit: proto::volume_usage::Unit| {
        *stats.usage.iter().find(|u| u.unit == unit as i32).unwrap()
    };
    // The share's inodes, not those of the node's directory where it is mounted.
    let inodes = usage(proto::volume_usage::Unit::Inodes);
    assert_eq!(inodes.total as u64, fs.f_files, "{inodes:?}");
    assert_eq!(inodes.available as u64, fs.f_favail, "{inodes:?}");
    // What the share still takes, not the volume's size less its use.
    let bytes = usage(proto::volume_usage::Unit::Bytes);
    assert!(
        bytes.available as u64 <= fs.f_bavail * fs.f_frsize,
        "{bytes:?} but the share has {} bytes available",
        fs.f_bavail * fs.f_frsize
    );
}
