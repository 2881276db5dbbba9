//! The shared backend on a real (bind-mounted) local share: markers, collisions, onDelete
//! modes, a second backend instance that knows nothing but the volume ID, and copies. Needs
//! root for the mounts; skips with a printed reason otherwise.

use super::*;
use crate::engine::params::{PV_NAME, PVC_NAME, PVC_NAMESPACE};

fn root_or_skip() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    eprintln!("SKIPPED: needs root (mounts)");
    false
}

struct Setup {
    _tmp: tempfile::TempDir,
    share: PathBuf,
    data: PathBuf,
    backend: SharedBackend,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let share = tmp.path().join("share");
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&share).unwrap();
    let backend = SharedBackend::new(&data, mounts::DEFAULT_TIMEOUT, "mount").unwrap();
    Setup {
        _tmp: tmp,
        share,
        data,
        backend,
    }
}

fn params(share: &Path, extra: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut p = BTreeMap::from([
        ("type".to_string(), "shared".to_string()),
        ("source".to_string(), share.to_string_lossy().into_owned()),
        ("fsType".to_string(), "none".to_string()),
    ]);
    for (k, v) in extra {
        p.insert(k.to_string(), v.to_string());
    }
    p
}

fn options(name: &str, parameters: BTreeMap<String, String>, pvc: &str) -> VolumeOptions {
    VolumeOptions {
        name: name.to_string(),
        parameters,
        metadata: BTreeMap::from([
            (PVC_NAMESPACE.to_string(), "shop".to_string()),
            (PVC_NAME.to_string(), pvc.to_string()),
            (PV_NAME.to_string(), name.to_string()),
        ]),
        ..Default::default()
    }
}

fn create(
    s: &Setup,
    name: &str,
    extra: &[(&str, &str)],
    pvc: &str,
) -> Result<VolumeId, BackendError> {
    let p = params(&s.share, extra);
    let id = s.backend.volume_id(name, &p, &[])?;
    s.backend.create(&id, &options(name, p, pvc))?;
    Ok(id)
}

#[test]
fn create_writes_marker_and_directory_and_is_idempotent() {
    if !root_or_skip() {
        return;
    }
    let s = setup();
    let tpl = [("subDir", "${pvc.metadata.namespace}/${pvc.metadata.name}")];
    let id = create(&s, "pv-1", &tpl, "data").unwrap();
    assert!(s.share.join("shop/data").is_dir());
    let marker: Marker = serde_json::from_slice(
        &std::fs::read(s.share.join(".k8scsi/volumes").join(id.as_str())).unwrap(),
    )
    .unwrap();
    assert_eq!(marker.dir, ["shop", "data"]);
    assert!(s.backend.exists(&id).unwrap());
    std::fs::write(s.share.join("shop/data/file"), b"x").unwrap();
    create(&s, "pv-1", &tpl, "data").unwrap();
    assert!(
        s.share.join("shop/data/file").exists(),
        "a retry keeps the data"
    );
    assert_eq!(
        s.backend.mounts().mounted(),
        0,
        "the share is unmounted after use"
    );
    assert!(!super::mounts::is_mount_point(
        &s.data.join("shares").join(share_of(&id).unwrap().key())
    ));
}

#[test]
fn colliding_and_nested_directories_are_refused_without_changes() {
    if !root_or_skip() {
        return;
    }
    let s = setup();
    create(&s, "pv-a", &[("subDir", "vols/${pvc.metadata.name}")], "a").unwrap();
    let before = std::fs::read_dir(s.share.join(".k8scsi/volumes"))
        .unwrap()
        .count();
    for (name, tpl, pvc) in [
        ("pv-b", "vols/${pvc.metadata.name}", "a"), // same directory
        ("pv-c", "vols", "x"),                      // would contain pv-a
        ("pv-d", "vols/a/inner", "x"),              // inside pv-a
    ] {
        let err = create(&s, name, &[("subDir", tpl)], pvc).unwrap_err();
        assert!(matches!(err, BackendError::Conflict(_)), "{name}: {err}");
    }
    std::fs::create_dir(s.share.join("foreign")).unwrap();
    let err = create(&s, "pv-e", &[("subDir", "foreign")], "x").unwrap_err();
    assert!(matches!(err, BackendError::Conflict(_)), "{err}");
    assert_eq!(
        std::fs::read_dir(s.share.join(".k8scsi/volumes"))
            .unwrap()
            .count(),
        before
    );
    assert!(!s.share.join("vols/a/inner").exists());
}

#[test]
fn on_delete_modes() {
    if !root_or_skip() {
        return;
    }
    let s = setup();
    let del = create(&s, "pv-del", &[("onDelete", "delete")], "x").unwrap();
    let keep = create(&s, "pv-keep", &[("onDelete", "retain")], "x").unwrap();
    let arch = create(&s, "pv-arch", &[("onDelete", "archive")], "x").unwrap();
    for dir in ["pv-del", "pv-keep", "pv-arch"] {
        std::fs::create_dir_all(s.share.join(dir).join("sub")).unwrap();
        std::fs::write(s.share.join(dir).join("sub/f"), b"data").unwrap();
    }
    // A link planted inside the volume must not take the deletion elsewhere.
    std::os::unix::fs::symlink(s.share.join("pv-keep"), s.share.join("pv-del/escape")).unwrap();
    for id in [&del, &keep, &arch] {
        s.backend.delete(id).unwrap();
        s.backend.delete(id).unwrap(); // idempotent
        assert!(!s.backend.exists(id).unwrap());
        assert!(!s.share.join(".k8scsi/volumes").join(id.as_str()).exists());
    }
    assert!(!s.share.join("pv-del").exists());
    assert_eq!(
        std::fs::read(s.share.join("pv-keep/sub/f")).unwrap(),
        b"data"
    );
    assert!(!s.share.join("pv-arch").exists());
    let archived: Vec<String> = std::fs::read_dir(&s.share)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("archived-pv-arch-"))
        .collect();
    assert_eq!(archived.len(), 1, "{archived:?}");
    assert_eq!(
        std::fs::read(s.share.join(&archived[0]).join("sub/f")).unwrap(),
        b"data"
    );
}

/// Entries at the share root starting with `prefix`.
fn root_entries(s: &Setup, prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(&s.share)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

#[test]
fn archiving_a_recreated_volume_again_keeps_every_copy() {
    if !root_or_skip() {
        return;
    }
    // Seen while adding `onDelete: archive` to tests/crash_mixed.rs (which re-creates and
    // deletes names quickly): a volume re-created and deleted again within the same second was
    // archived under the name of its earlier copy, so the rename failed (ENOTEMPTY) or, for an
    // empty directory, silently replaced that copy.
    let s = setup();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // Copies archived earlier, whichever second the deletions below land in.
    for t in now - 1..=now + 5 {
        let dir = s.share.join(format!("archived-pv-twice-{t}"));
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("old"), t.to_string()).unwrap();
    }
    for round in 0..3 {
        let id = create(&s, "pv-twice", &[("onDelete", "archive")], "x").unwrap();
        if round != 1 {
            std::fs::write(s.share.join("pv-twice/f"), format!("round {round}")).unwrap();
        }
        s.backend.delete(&id).unwrap();
        assert!(!s.share.join("pv-twice").exists());
    }
    let archived = root_entries(&s, "archived-pv-twice-");
    assert_eq!(archived.len(), 7 + 3, "{archived:?}");
    for t in now - 1..=now + 5 {
        let old = s.share.join(format!("archived-pv-twice-{t}/old"));
        assert_eq!(std::fs::read_to_string(old).unwrap(), t.to_string());
    }
    let mut rounds: Vec<String> = archived
        .iter()
        .filter_map(|n| std::fs::read_to_string(s.share.join(n).join("f")).ok())
        .collect();
    rounds.sort();
    assert_eq!(rounds, ["round 0", "round 2"]);
}

#[test]
fn archiving_a_volume_with_a_long_leaf_keeps_the_name_within_name_max() {
    if !root_or_skip() {
        return;
    }
    // A 240-byte leaf (`subDir: ${pvc.metadata.name}`, PVC names may have 253 characters)
    // made `archived-<leaf>-<unix time>` 260 bytes: DeleteVolume failed with "File name too
    // long" on every retry.
    let s = setup();
    let tpl = [("subDir", "${pvc.metadata.name}"), ("onDelete", "archive")];
    let pvc_a = format!("{}a", "p".repeat(239));
    let pvc_b = format!("{}b", "p".repeat(239));
    for (name, pvc) in [("pv-long-a", &pvc_a), ("pv-long-b", &pvc_b)] {
        let id = create(&s, name, &tpl, pvc).unwrap();
        std::fs::write(s.share.join(pvc).join("f"), name).unwrap();
        s.backend.delete(&id).unwrap();
        s.backend.delete(&id).unwrap(); // idempotent
        assert!(!s.share.join(pvc).exists());
        assert!(!s.backend.exists(&id).unwrap());
    }
    let archived = root_entries(&s, "archived-");
    assert_eq!(archived.len(), 2, "{archived:?}");
    let mut contents = Vec::new();
    for n in &archived {
        assert!(n.len() <= 255, "{} bytes: {n}", n.len());
        assert!(
            n.starts_with(&format!("archived-{}", "p".repeat(200))),
            "{n}"
        );
        contents.push(std::fs::read_to_string(s.share.join(n).join("f")).unwrap());
    }
    contents.sort();
    assert_eq!(contents, ["pv-long-a", "pv-long-b"]);
}

#[test]
fn archive_leaf_shortens_only_what_does_not_fit() {
    let now = "1796000000";
    for len in [1, 100, 230] {
        let leaf = "x".repeat(len);
        assert_eq!(archive_leaf(&leaf, now), leaf.as_str());
    }
    let mut seen = std::collections::BTreeSet::new();
    for len in 231..=255 {
        for last in ['a', 'b'] {
            let leaf = format!("{}{last}", "x".repeat(len - 1));
            let short = archive_leaf(&leaf, now);
            let name = format!("archived-{short}-{now}.9999");
            assert!(name.len() <= 255, "{len}: {} bytes", name.len());
            assert!(
                short.starts_with(&"x".repeat(200)) && short.contains('~'),
                "{short}"
            );
            assert!(seen.insert(short.into_owned()), "{len} {last}: collides");
        }
    }
    // Cut at a character boundary, never inside one.
    let leaf = "é".repeat(127);
    let short = archive_leaf(&leaf, now);
    assert!(format!("archived-{short}-{now}.9999").len() <= 255);
    assert!(short.starts_with("éé"));
}

#[test]
fn discarding_an_unrecorded_restore_ignores_the_retention_policy() {
    if !root_or_skip() {
        return;
    }
    // Found by tests/crash_mixed.rs (an `archived-` directory for a name never deleted): a
    // restore complete on the share whose record was never committed (a crash in between) is
    // removed by the engine's retry before it copies again. With `archive` that left an
    // archived copy of a volume nobody was ever given; with `retain` the directory without its
    // marker, so the retry failed for good ("belongs to no volume of ours").
    let s = setup();
    let v = create(&s, "pv-src", &[], "x").unwrap();
    std::fs::write(s.share.join("pv-src/f"), b"snapshotted").unwrap();
    let snap = SnapshotId::for_source(&v, "snap-1");
    s.backend.snapshot(&v, &snap, Cancel::never()).unwrap();
    for (name, policy) in [("pv-retain", "retain"), ("pv-archive", "archive")] {
        let p = params(&s.share, &[("onDelete", policy)]);
        let id = s.backend.volume_id(name, &p, &[]).unwrap();
        let restore = || {
            s.backend.create_from(
                &id,
                ContentSource::Snapshot(&snap),
                &options(name, p.clone(), "y"),
            )
        };
        restore().unwrap();
        // What the engine does when CreateVolume is retried without a record.
        assert!(s.backend.exists(&id).unwrap());
        s.backend.discard(&id).unwrap();
        assert!(!s.share.join(name).exists(), "{policy}");
        restore().unwrap();
        assert_eq!(
            std::fs::read(s.share.join(name).join("f")).unwrap(),
            b"snapshotted"
        );
        assert_eq!(root_entries(&s, "archived-"), Vec::<String>::new());
        // A recorded volume's deletion still follows the policy.
        s.backend.delete(&id).unwrap();
        assert_eq!(s.share.join(name).exists(), policy == "retain");
    }
    assert_eq!(root_entries(&s, "archived-pv-archive-").len(), 1);
}

#[test]
fn a_fresh_backend_deletes_by_volume_id_alone() {
    if !root_or_skip() {
        return;
    }
    let s = setup();
    let id = create(&s, "pv-1", &[("subDir", "team/${pv.metadata.name}")], "x").unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let fresh = SharedBackend::new(elsewhere.path(), mounts::DEFAULT_TIMEOUT, "mount").unwrap();
    let reparsed = VolumeId::parse(id.as_str()).unwrap();
    assert!(fresh.exists(&reparsed).unwrap());
    fresh.delete(&reparsed).unwrap();
    assert!(!s.share.join("team/pv-1").exists());
    assert!(
        s.share.join("team").is_dir(),
        "only the volume's own directory goes"
    );
}

#[test]
fn a_tampered_marker_is_not_acted_on() {
    if !root_or_skip() {
        return;
    }
    let s = setup();
    let id = create(&s, "pv-1", &[], "x").unwrap();
    std::fs::create_dir(s.share.join("victim")).unwrap();
    let path = s.share.join(".k8scsi/volumes").join(id.as_str());
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("\"pv-1\"\n", "\"..\"\n")).unwrap();
    assert!(s.backend.delete(&id).is_err());
    assert!(s.share.join("victim").exists() && s.share.join("pv-1").exists());
}

#[test]
fn copy_volume_copies_within_the_share() {
    if !root_or_skip() {
        return;
    }
    let s = setup();
    let a = create(&s, "pv-a", &[], "a").unwrap();
    let b = create(&s, "pv-b", &[], "b").unwrap();
    std::fs::create_dir(s.share.join("pv-a/d")).unwrap();
    std::fs::write(s.share.join("pv-a/d/f"), b"content").unwrap();
    let stats = s.backend.copy_volume(&a, &b).unwrap();
    assert_eq!(stats.files, 1);
    assert_eq!(std::fs::read(s.share.join("pv-b/d/f")).unwrap(), b"content");
    let other = tempfile::tempdir().unwrap();
    let p = params(other.path(), &[]);
    let foreign = s.backend.volume_id("pv-c", &p, &[]).unwrap();
    assert!(s.backend.copy_volume(&a, &foreign).is_err());
}

#[test]
fn stale_temporary_markers_are_cleaned_up() {
    if !root_or_skip() {
        return;
    }
    let s = setup();
    create(&s, "pv-1", &[], "x").unwrap();
    let markers = s.share.join(".k8scsi/volumes");
    let old = markers.join(".tmp-shared-dead");
    let fresh = markers.join(".tmp-shared-busy");
    std::fs::write(&old, b"{").unwrap();
    std::fs::write(&fresh, b"{").unwrap();
    let hour_ago = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: std::time::SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64
                - 3600,
            tv_nsec: 0,
        },
    };
    rustix::fs::utimensat(rustix::fs::CWD, &old, &hour_ago, AtFlags::empty()).unwrap();
    // Any create lists the markers (collision check) and sweeps stale temporaries.
    create(&s, "pv-2", &[], "x").unwrap();
    assert!(!old.exists(), "a temporary marker an hour old is removed");
    assert!(fresh.exists(), "a fresh one may be being written: kept");
}

#[test]
fn snapshots_are_complete_only_with_their_marker_and_deleted_alone() {
    if !root_or_skip() {
        return;
    }
    let s = setup();
    let v = create(&s, "pv-1", &[("onDelete", "retain")], "x").unwrap();
    std::fs::write(s.share.join("pv-1/f"), b"one").unwrap();
    let snap = SnapshotId::for_source(&v, "snap-1");
    let dir = s.share.join(".k8scsi/snapshots").join(snap.as_str());

    // A partial copy (no marker) is neither found nor restored from; taking the snapshot
    // replaces it.
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(dir.join("data/stale"), b"partial").unwrap();
    assert!(!s.backend.snapshot_exists(&snap).unwrap());
    assert_eq!(s.backend.stored_snapshot(&snap).unwrap(), None);
    assert_eq!(
        s.backend.snapshot(&v, &snap, Cancel::never()).unwrap(),
        Mechanism::Copy
    );
    assert!(!dir.join("data/stale").exists());
    assert_eq!(std::fs::read(dir.join("data/f")).unwrap(), b"one");
    assert_eq!(
        s.backend.stored_snapshot(&snap).unwrap(),
        Some(StoredSnapshot {
            source_volume_id: v.to_string(),
            size_bytes: 0,
        })
    );

    // A restore while the volume is being filled is `delete` on the share; the requested
    // onDelete only once the copy is complete.
    let p = params(&s.share, &[("onDelete", "retain")]);
    let restored = s.backend.volume_id("pv-2", &p, &[]).unwrap();
    let (enforcement, mechanism) = s
        .backend
        .create_from(
            &restored,
            ContentSource::Snapshot(&snap),
            &VolumeOptions {
                capacity_bytes: 5 << 20,
                ..options("pv-2", p, "y")
            },
        )
        .unwrap();
    assert_eq!(
        (enforcement, mechanism),
        (Enforcement::None, Mechanism::Copy)
    );
    assert_eq!(std::fs::read(s.share.join("pv-2/f")).unwrap(), b"one");
    let marker: Marker = serde_json::from_slice(
        &std::fs::read(s.share.join(".k8scsi/volumes").join(restored.as_str())).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (marker.on_delete, marker.capacity_bytes),
        (OnDelete::Retain, 5 << 20)
    );

    // A restore whose copy fails (the target already holds a file of the same name, as an
    // interrupted copy would leave behind if the engine did not delete it first) leaves
    // nothing: its marker said `delete` while it was being filled.
    let p = params(&s.share, &[("onDelete", "retain")]);
    let failing = s.backend.volume_id("pv-3", &p, &[]).unwrap();
    let fs_marker = Marker {
        id: failing.to_string(),
        name: "pv-3".into(),
        dir: vec!["pv-3".into()],
        on_delete: OnDelete::Delete,
        capacity_bytes: 0,
        created_unix: 0,
    };
    std::fs::write(
        s.share.join(".k8scsi/volumes").join(failing.as_str()),
        serde_json::to_vec(&fs_marker).unwrap(),
    )
    .unwrap();
    std::fs::create_dir(s.share.join("pv-3")).unwrap();
    std::fs::write(s.share.join("pv-3/f"), b"in the way").unwrap();
    assert!(
        s.backend
            .create_from(
                &failing,
                ContentSource::Snapshot(&snap),
                &options("pv-3", p, "z")
            )
            .is_err()
    );
    assert!(!s.share.join("pv-3").exists());
    assert!(
        !s.share
            .join(".k8scsi/volumes")
            .join(failing.as_str())
            .exists()
    );

    // A marker that names another snapshot is not used.
    let other = SnapshotId::for_source(&v, "snap-2");
    let other_dir = s.share.join(".k8scsi/snapshots").join(other.as_str());
    std::fs::create_dir_all(other_dir.join("data")).unwrap();
    std::fs::copy(dir.join("snapshot.json"), other_dir.join("snapshot.json")).unwrap();
    assert!(s.backend.stored_snapshot(&other).is_err());

    // Deleting removes the snapshot's own directory and nothing else; deleting again is fine.
    s.backend.delete_snapshot(&snap).unwrap();
    assert!(!dir.exists());
    assert!(other_dir.exists() && s.share.join("pv-1/f").exists());
    s.backend.delete_snapshot(&snap).unwrap();
    s.backend.delete_snapshot(&other).unwrap();
    assert!(!other_dir.exists());

    // An expansion is kept in the volume's marker, so a later snapshot restores at that size
    // even for a controller without the store.
    s.backend.expand(&v, 7 << 20).unwrap();
    let grown = SnapshotId::for_source(&v, "snap-3");
    s.backend.snapshot(&v, &grown, Cancel::never()).unwrap();
    assert_eq!(
        s.backend
            .stored_snapshot(&grown)
            .unwrap()
            .unwrap()
            .size_bytes,
        7 << 20
    );
    s.backend.delete_snapshot(&grown).unwrap();
}
