//! Engine unit tests: the real store and `dir` backend on a temporary directory, with the
//! [`FakeMounter`] standing in for mount syscalls so publication logic runs without root.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::*;
use crate::backend::dir::DirBackend;
use crate::mount::MountError;
use crate::mount::fake::{self, Call, FakeMounter};

struct Fixture {
    _dir: tempfile::TempDir,
    engine: Engine,
    mounter: Arc<FakeMounter>,
    kubelet: PathBuf,
}

fn fixture() -> Fixture {
    fixture_with_timeout(std::time::Duration::from_secs(30))
}

fn fixture_with_timeout(mount_timeout: std::time::Duration) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let kubelet = dir.path().join("kubelet");
    std::fs::create_dir_all(&kubelet).unwrap();
    let store = Store::open(&dir.path().join("state")).unwrap();
    let backend = Arc::new(DirBackend::new(&dir.path().join("data")).unwrap());
    let mounter = Arc::new(FakeMounter::default());
    let engine = Engine::new(
        EngineConfig {
            node_id: "node-a".into(),
            topology_key: "topology.k8scsi.io/node".into(),
            max_volumes_per_node: 0,
            kubelet_dir: kubelet.clone(),
            serves_node: true,
            mount_timeout,
        },
        store,
        vec![backend],
        mounter.clone(),
    );
    Fixture {
        _dir: dir,
        engine,
        mounter,
        kubelet,
    }
}

fn mount_cap(mode: AccessMode) -> Capability {
    Capability {
        access_type: AccessType::Mount {
            fs_type: String::new(),
            mount_flags: vec![],
        },
        access_mode: mode,
    }
}

fn create(name: &str, bytes: u64) -> CreateVolume {
    CreateVolume {
        name: name.into(),
        capacity: CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        },
        capabilities: vec![mount_cap(AccessMode::SingleNodeWriter)],
        parameters: BTreeMap::from([("enforceCapacity".to_string(), "false".to_string())]),
        topology: None,
        content_source: None,
    }
}

impl Fixture {
    fn target(&self, pod: &str) -> String {
        self.kubelet
            .join("pods")
            .join(pod)
            .join("mount")
            .to_string_lossy()
            .into_owned()
    }

    fn publish(&self, id: &VolumeId, target: &str, mode: AccessMode, readonly: bool) -> Publish {
        Publish {
            volume_id: id.to_string(),
            target_path: target.into(),
            staging_target_path: String::new(),
            capability: mount_cap(mode),
            readonly,
        }
    }
}

#[tokio::test]
async fn create_is_idempotent_and_detects_conflicts() {
    let f = fixture();
    let a = f
        .engine
        .create_volume(create("pvc-1", 1 << 20))
        .await
        .unwrap();
    let again = f
        .engine
        .create_volume(create("pvc-1", 1 << 20))
        .await
        .unwrap();
    assert_eq!(a, again);
    assert!(matches!(
        f.engine.create_volume(create("pvc-1", 2 << 20)).await,
        Err(Error::AlreadyExists { .. })
    ));
    let mut other_mode = create("pvc-1", 1 << 20);
    other_mode.capabilities = vec![mount_cap(AccessMode::SingleNodeReaderOnly)];
    assert!(matches!(
        f.engine.create_volume(other_mode).await,
        Err(Error::AlreadyExists { .. })
    ));
    assert_eq!(f.engine.store().all_volumes().unwrap().len(), 1);
}

#[tokio::test]
async fn create_rejects_bad_input_without_touching_disk() {
    let f = fixture();
    let mut bad_param = create("pvc-x", 0);
    bad_param.parameters.insert("fstype".into(), "ext4".into());
    assert!(matches!(
        f.engine.create_volume(bad_param).await,
        Err(Error::UnknownParameter(k)) if k == "fstype"
    ));
    let mut block = create("pvc-x", 0);
    block.capabilities[0].access_type = AccessType::Block;
    assert!(matches!(
        f.engine.create_volume(block).await,
        Err(Error::Invalid { .. })
    ));
    let mut range = create("pvc-x", 10);
    range.capacity.limit_bytes = 5;
    assert!(matches!(
        f.engine.create_volume(range).await,
        Err(Error::CapacityOutOfRange(_))
    ));
    assert!(matches!(
        f.engine.create_volume(create("pvc-x", u64::MAX / 2)).await,
        Err(Error::CapacityOutOfRange(_))
    ));
    let mut elsewhere = create("pvc-x", 0);
    elsewhere.topology = Some(TopologyRequirement {
        requisite: vec![BTreeMap::from([(
            "topology.k8scsi.io/node".to_string(),
            "node-b".to_string(),
        )])],
        preferred: vec![],
    });
    assert!(matches!(
        f.engine.create_volume(elsewhere).await,
        Err(Error::Exhausted(_))
    ));
    assert!(f.engine.store().all_volumes().unwrap().is_empty());
    assert!(f.engine.backends["dir"].list().unwrap().is_empty());
}

#[tokio::test]
async fn busy_names_and_volumes_are_aborted() {
    let f = fixture();
    let id = VolumeId::for_name("dir", "pvc-busy");
    let _held = f.engine.lock(vec![format!("vol:{id}")]).unwrap();
    assert!(matches!(
        f.engine.create_volume(create("pvc-busy", 0)).await,
        Err(Error::InProgress(_))
    ));
    assert!(matches!(
        f.engine.delete_volume(id.as_str()).await,
        Err(Error::InProgress(_))
    ));
}

#[tokio::test]
async fn delete_is_idempotent_and_refuses_published_volumes() {
    let f = fixture();
    let v = f.engine.create_volume(create("pvc-2", 0)).await.unwrap();
    let target = f.target("p1");
    f.engine
        .publish(f.publish(&v.id, &target, AccessMode::SingleNodeWriter, false))
        .await
        .unwrap();
    assert!(matches!(
        f.engine.delete_volume(v.id.as_str()).await,
        Err(Error::Precondition(_))
    ));
    f.engine.unpublish(v.id.as_str(), &target).await.unwrap();
    f.engine.delete_volume(v.id.as_str()).await.unwrap();
    f.engine.delete_volume(v.id.as_str()).await.unwrap();
    f.engine.delete_volume("not-ours").await.unwrap();
    assert!(matches!(
        f.engine.delete_volume("a\0b").await,
        Err(Error::Invalid { .. })
    ));
    assert!(f.engine.store().all_volumes().unwrap().is_empty());
}

#[tokio::test]
async fn publish_binds_once_and_applies_options() {
    let f = fixture();
    let v = f.engine.create_volume(create("pvc-3", 0)).await.unwrap();
    let target = f.target("p1");
    let mut request = f.publish(&v.id, &target, AccessMode::SingleNodeWriter, true);
    request.capability.access_type = AccessType::Mount {
        fs_type: String::new(),
        mount_flags: vec!["noexec".into()],
    };
    f.engine.publish(request.clone()).await.unwrap();
    f.engine.publish(request.clone()).await.unwrap();
    let binds: Vec<Call> = f
        .mounter
        .calls()
        .into_iter()
        .filter(|c| matches!(c, Call::Bind { .. }))
        .collect();
    assert_eq!(binds.len(), 1, "a repeated publish must not mount twice");
    let Call::Bind { options, .. } = &binds[0] else {
        unreachable!()
    };
    assert!(options.readonly && options.noexec);

    // Same target, different options: ALREADY_EXISTS.
    let rw = f.publish(&v.id, &target, AccessMode::SingleNodeWriter, false);
    assert!(matches!(
        f.engine.publish(rw).await,
        Err(Error::PublishedDifferently(_))
    ));
}

#[tokio::test]
async fn publish_remounts_after_reboot() {
    let f = fixture();
    let v = f.engine.create_volume(create("pvc-4", 0)).await.unwrap();
    let target = f.target("p1");
    let request = f.publish(&v.id, &target, AccessMode::SingleNodeWriter, false);
    f.engine.publish(request.clone()).await.unwrap();
    f.mounter.drop_all_mounts();
    let report = f.engine.reconcile().unwrap();
    assert_eq!(report.lost_publications, vec![target.clone()]);
    f.engine.publish(request).await.unwrap();
    assert!(f.engine.reconcile().unwrap().lost_publications.is_empty());
}

#[tokio::test]
async fn single_writer_allows_one_publication() {
    let f = fixture();
    let v = f.engine.create_volume(create("pvc-5", 0)).await.unwrap();
    f.engine
        .publish(f.publish(
            &v.id,
            &f.target("p1"),
            AccessMode::SingleNodeSingleWriter,
            false,
        ))
        .await
        .unwrap();
    assert!(matches!(
        f.engine
            .publish(f.publish(
                &v.id,
                &f.target("p2"),
                AccessMode::SingleNodeSingleWriter,
                false
            ))
            .await,
        Err(Error::Precondition(_))
    ));
}

#[tokio::test]
async fn publish_rejects_hostile_paths_and_flags() {
    let f = fixture();
    let v = f.engine.create_volume(create("pvc-6", 0)).await.unwrap();
    for target in ["/etc/passwd", "relative/path", "/tmp/../etc"] {
        assert!(matches!(
            f.engine
                .publish(f.publish(&v.id, target, AccessMode::SingleNodeWriter, false))
                .await,
            Err(Error::Invalid {
                field: "target_path",
                ..
            })
        ));
    }
    let escape = format!("{}/pods/../../etc", f.kubelet.display());
    assert!(
        f.engine
            .publish(f.publish(&v.id, &escape, AccessMode::SingleNodeWriter, false))
            .await
            .is_err()
    );
    let mut flags = f.publish(&v.id, &f.target("p1"), AccessMode::SingleNodeWriter, false);
    flags.capability.access_type = AccessType::Mount {
        fs_type: String::new(),
        mount_flags: vec!["upperdir=/etc".into()],
    };
    assert!(matches!(
        f.engine.publish(flags).await,
        Err(Error::Invalid { .. })
    ));
    assert!(f.mounter.calls().is_empty(), "nothing may be mounted");
}

#[tokio::test]
async fn unpublish_leaves_foreign_mounts_alone() {
    let f = fixture();
    let a = f.engine.create_volume(create("pvc-7", 0)).await.unwrap();
    let b = f.engine.create_volume(create("pvc-8", 0)).await.unwrap();
    let target = f.target("p1");
    f.engine
        .publish(f.publish(&a.id, &target, AccessMode::SingleNodeWriter, false))
        .await
        .unwrap();
    // Volume b was never published there: unpublishing it must not unmount a's mount.
    assert!(matches!(
        f.engine.unpublish(b.id.as_str(), &target).await,
        Err(Error::Precondition(_))
    ));
    f.engine.unpublish(a.id.as_str(), &target).await.unwrap();
    f.engine.unpublish(a.id.as_str(), &target).await.unwrap();
}

#[tokio::test]
async fn stats_report_usage_and_condition() {
    let f = fixture();
    let v = f
        .engine
        .create_volume(create("pvc-9", 8 << 20))
        .await
        .unwrap();
    let target = f.target("p1");
    f.engine
        .publish(f.publish(&v.id, &target, AccessMode::SingleNodeWriter, false))
        .await
        .unwrap();
    std::fs::write(
        f.engine.backends["dir"].volume_path(&v.id).join("data"),
        vec![1u8; 1 << 20],
    )
    .unwrap();
    let stats = f.engine.stats(v.id.as_str(), &target).await.unwrap();
    assert_eq!(stats.total_bytes, 8 << 20);
    assert!(stats.used_bytes >= 1 << 20);
    assert_eq!(stats.used_inodes, 2);
    assert!(!stats.condition.abnormal);

    f.mounter.drop_all_mounts();
    let broken = f.engine.stats(v.id.as_str(), &target).await.unwrap();
    assert!(broken.condition.abnormal, "{broken:?}");

    assert!(matches!(
        f.engine.stats(v.id.as_str(), &f.target("elsewhere")).await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        f.engine
            .stats("dir-00000000000000000000000000000000", &target)
            .await,
        Err(Error::VolumeNotFound(_))
    ));
}

#[tokio::test]
async fn list_tokens_survive_concurrent_changes() {
    let f = fixture();
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(
            f.engine
                .create_volume(create(&format!("pvc-l{i}"), 0))
                .await
                .unwrap()
                .id,
        );
    }
    let first = f.engine.list_volumes(3, "").unwrap();
    assert_eq!(first.entries.len(), 3);
    let token = first.next_token.unwrap();
    // Delete the next volume the token points at, and add a new one.
    f.engine.delete_volume(ids[3].as_str()).await.unwrap();
    let added = f.engine.create_volume(create("pvc-new", 0)).await.unwrap();
    let rest = f.engine.list_volumes(0, &token).unwrap();
    let rest_ids: Vec<_> = rest.entries.iter().map(|(v, _)| v.id.clone()).collect();
    assert_eq!(rest_ids, vec![ids[4].clone(), ids[5].clone(), added.id]);
    assert!(rest.next_token.is_none());
    assert!(matches!(
        f.engine.list_volumes(0, "bogus"),
        Err(Error::BadToken(_))
    ));
    assert!(matches!(
        f.engine.list_volumes(0, "999"),
        Err(Error::BadToken(_))
    ));
}

#[tokio::test]
async fn reconcile_reports_orphans_and_missing_storage() {
    let f = fixture();
    let v = f.engine.create_volume(create("pvc-r", 0)).await.unwrap();
    let orphan = VolumeId::for_name("dir", "never-recorded");
    f.engine.backends["dir"]
        .create(&orphan, &crate::backend::VolumeOptions::default())
        .unwrap();
    std::fs::remove_dir(f.engine.backends["dir"].volume_path(&v.id)).unwrap();
    let report = f.engine.reconcile().unwrap();
    assert_eq!(report.orphaned_storage, vec![orphan.to_string()]);
    assert_eq!(report.missing_storage, vec![v.id.to_string()]);
    // Nothing was deleted.
    assert!(f.engine.backends["dir"].exists(&orphan).unwrap());
    let (_, status) = f.engine.get_volume(v.id.as_str()).unwrap();
    assert!(status.condition.abnormal);
}

#[tokio::test]
async fn unenforceable_sizes_are_refused_unless_the_class_opts_out() {
    let f = fixture();
    if crate::backend::btrfs::is_btrfs(f._dir.path()) {
        eprintln!("SKIPPED: the temp dir is on btrfs, where sizes are enforceable");
        return;
    }
    let mut strict = create("pvc-strict", 1 << 20);
    strict.parameters.clear();
    match f.engine.create_volume(strict).await {
        Err(Error::Backend(crate::backend::BackendError::Unenforceable(message))) => {
            assert!(message.contains("enforceCapacity"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert!(f.engine.store().all_volumes().unwrap().is_empty());
    let relaxed = f
        .engine
        .create_volume(create("pvc-relaxed", 1 << 20))
        .await
        .unwrap();
    assert_eq!(relaxed.context[CONTEXT_ENFORCEMENT], "none");
}

#[tokio::test]
async fn expansion_grows_and_never_shrinks() {
    let f = fixture();
    let v = f
        .engine
        .create_volume(create("pvc-grow", 1 << 20))
        .await
        .unwrap();
    let grow = CapacityRange {
        required_bytes: 4 << 20,
        limit_bytes: 0,
    };
    assert_eq!(
        f.engine
            .expand_volume(v.id.as_str(), grow, None)
            .await
            .unwrap(),
        (4 << 20, false)
    );
    assert_eq!(
        f.engine
            .expand_volume(v.id.as_str(), grow, None)
            .await
            .unwrap(),
        (4 << 20, false)
    );
    // Already larger than asked: OK with the size it has (the spec's SHOULD), never shrunk.
    let smaller = CapacityRange {
        required_bytes: 2 << 20,
        limit_bytes: 0,
    };
    assert_eq!(
        f.engine
            .expand_volume(v.id.as_str(), smaller, None)
            .await
            .unwrap(),
        (4 << 20, false)
    );
    // A limit below its size cannot be met without shrinking.
    let shrink = CapacityRange {
        required_bytes: 2 << 20,
        limit_bytes: 3 << 20,
    };
    assert!(matches!(
        f.engine.expand_volume(v.id.as_str(), shrink, None).await,
        Err(Error::CapacityOutOfRange(_))
    ));
    let (volume, _) = f.engine.get_volume(v.id.as_str()).unwrap();
    assert_eq!(volume.capacity_bytes, 4 << 20);
    assert!(matches!(
        f.engine
            .expand_volume("dir-00000000000000000000000000000000", grow, None)
            .await,
        Err(Error::VolumeNotFound(_))
    ));
}

/// Waits (polling, generously) until the fake has seen `call`.
async fn wait_for_call(mounter: &FakeMounter, call: &Call) {
    for _ in 0..6000 {
        if mounter.calls().contains(call) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("{call:?} never happened: {:?}", mounter.calls());
}

/// Bounds a future that must not hang, so a regression fails instead of blocking the suite:
/// on timeout the hung `path` is released first (the runtime waits for its blocking threads
/// when it shuts down), then the test panics.
async fn within<T>(
    what: &str,
    mounter: &FakeMounter,
    path: &std::path::Path,
    fut: impl std::future::Future<Output = T>,
) -> T {
    match tokio::time::timeout(std::time::Duration::from_secs(60), fut).await {
        Ok(v) => v,
        Err(_) => {
            mounter.release(path);
            panic!("{what} hung");
        }
    }
}

#[tokio::test]
async fn unpublish_detaches_a_target_whose_unmount_hangs() {
    let f = fixture_with_timeout(std::time::Duration::from_millis(200));
    let v = f.engine.create_volume(create("pvc-h1", 0)).await.unwrap();
    let target = f.target("p1");
    f.engine
        .publish(f.publish(&v.id, &target, AccessMode::SingleNodeWriter, false))
        .await
        .unwrap();
    let abs = PathBuf::from(&target);
    f.mounter.hang(fake::Op::Unmount, &abs);
    within(
        "unpublish",
        &f.mounter,
        &abs,
        f.engine.unpublish(v.id.as_str(), &target),
    )
    .await
    .unwrap();
    let calls = f.mounter.calls();
    assert!(calls.contains(&Call::Unmount(abs.clone())), "{calls:?}");
    assert!(calls.contains(&Call::Detach(abs.clone())), "{calls:?}");
    assert!(
        calls.contains(&Call::RemoveTarget(abs.clone())),
        "{calls:?}"
    );
    assert!(
        f.engine
            .store()
            .publications(v.id.as_str())
            .unwrap()
            .is_empty()
    );
    // The stuck unmount finally returns; it finds nothing left to do and changes nothing.
    f.mounter.release(&abs);
    f.engine.delete_volume(v.id.as_str()).await.unwrap();
}

#[tokio::test]
async fn unpublish_detaches_a_recorded_target_whose_inspection_hangs() {
    let f = fixture_with_timeout(std::time::Duration::from_millis(200));
    let a = f.engine.create_volume(create("pvc-h2", 0)).await.unwrap();
    let b = f.engine.create_volume(create("pvc-h3", 0)).await.unwrap();
    let target = f.target("p1");
    f.engine
        .publish(f.publish(&a.id, &target, AccessMode::SingleNodeWriter, false))
        .await
        .unwrap();
    let abs = PathBuf::from(&target);
    f.mounter.hang(fake::Op::Inspect, &abs);
    // Volume b was never published there: a hung target is not detached on its behalf.
    let err = within(
        "unpublish of b",
        &f.mounter,
        &abs,
        f.engine.unpublish(b.id.as_str(), &target),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, Error::Mount(MountError::TimedOut { .. })),
        "{err:?}"
    );
    assert!(!f.mounter.calls().contains(&Call::Detach(abs.clone())));
    assert_eq!(
        f.engine.store().publications(a.id.as_str()).unwrap().len(),
        1
    );
    within(
        "unpublish of a",
        &f.mounter,
        &abs,
        f.engine.unpublish(a.id.as_str(), &target),
    )
    .await
    .unwrap();
    let calls = f.mounter.calls();
    assert!(calls.contains(&Call::Detach(abs.clone())), "{calls:?}");
    assert!(!calls.contains(&Call::Unmount(abs.clone())), "{calls:?}");
    assert!(
        f.engine
            .store()
            .publications(a.id.as_str())
            .unwrap()
            .is_empty()
    );
    f.mounter.release(&abs);
}

#[tokio::test]
async fn a_hung_unpublish_does_not_delay_another_volume() {
    // A timeout far longer than the test: volume a stays stuck until the test releases it, so
    // b finishing first shows it never waited for a (no timing is measured).
    let f = fixture_with_timeout(std::time::Duration::from_secs(600));
    let a = f.engine.create_volume(create("pvc-h4", 0)).await.unwrap();
    let b = f.engine.create_volume(create("pvc-h5", 0)).await.unwrap();
    let (ta, tb) = (f.target("p1"), f.target("p2"));
    for (v, t) in [(&a, &ta), (&b, &tb)] {
        f.engine
            .publish(f.publish(&v.id, t, AccessMode::SingleNodeWriter, false))
            .await
            .unwrap();
    }
    let abs_a = PathBuf::from(&ta);
    f.mounter.hang(fake::Op::Unmount, &abs_a);
    let stuck = f.engine.unpublish(a.id.as_str(), &ta);
    let other = async {
        wait_for_call(&f.mounter, &Call::Unmount(abs_a.clone())).await;
        f.engine.unpublish(b.id.as_str(), &tb).await.unwrap();
        assert!(
            f.engine
                .store()
                .publications(b.id.as_str())
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            f.engine.store().publications(a.id.as_str()).unwrap().len(),
            1
        );
        f.mounter.release(&abs_a);
    };
    let (stuck, ()) = within("unpublishing both", &f.mounter, &abs_a, async {
        tokio::join!(stuck, other)
    })
    .await;
    stuck.unwrap();
    assert!(
        f.engine
            .store()
            .publications(a.id.as_str())
            .unwrap()
            .is_empty()
    );
    assert!(!f.mounter.calls().contains(&Call::Detach(abs_a)));
}

#[tokio::test]
async fn stats_of_a_hung_target_report_abnormal_and_do_not_probe_it_again() {
    let f = fixture_with_timeout(std::time::Duration::from_millis(300));
    let v = f.engine.create_volume(create("pvc-h4", 0)).await.unwrap();
    let w = f.engine.create_volume(create("pvc-h5", 0)).await.unwrap();
    let (target, other) = (f.target("p1"), f.target("p2"));
    for (id, t) in [(&v.id, &target), (&w.id, &other)] {
        f.engine
            .publish(f.publish(id, t, AccessMode::SingleNodeWriter, false))
            .await
            .unwrap();
    }
    let abs = PathBuf::from(&target);
    f.mounter.hang(fake::Op::Inspect, &abs);
    let stats = within(
        "stats",
        &f.mounter,
        &abs,
        f.engine.stats(v.id.as_str(), &target),
    )
    .await
    .unwrap();
    assert!(stats.condition.abnormal, "{:?}", stats.condition);
    assert!(
        stats.condition.message.contains("did not finish within"),
        "{}",
        stats.condition.message
    );
    assert_eq!(f.engine.probes().blocked_threads(), 1);
    // Asked again while the first inspection is still blocked: no second thread.
    let again = within(
        "stats again",
        &f.mounter,
        &abs,
        f.engine.stats(v.id.as_str(), &target),
    )
    .await
    .unwrap();
    assert!(
        again.condition.message.contains("has not returned"),
        "{}",
        again.condition.message
    );
    assert_eq!(f.engine.probes().blocked_threads(), 1);
    // The other volume is unaffected.
    let fine = f.engine.stats(w.id.as_str(), &other).await.unwrap();
    assert!(!fine.condition.abnormal, "{:?}", fine.condition);
    f.mounter.release(&abs);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while f.engine.probes().blocked_threads() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the blocked call never returned"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let healed = f.engine.stats(v.id.as_str(), &target).await.unwrap();
    assert!(!healed.condition.abnormal, "{:?}", healed.condition);
}
