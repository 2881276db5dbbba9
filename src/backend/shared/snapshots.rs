//! Snapshots and clones of shared volumes, kept on the share itself.
//!
//! A snapshot of a shared volume is `<share>/.k8scsi/snapshots/<snapshot-id>/`: a `data`
//! directory holding a copy of the volume's tree (per file by reflink when the share's
//! filesystem supports it, else a copy that keeps holes) and a `snapshot.json` marker, written
//! atomically once the copy has reached the share. The marker is what makes the snapshot
//! complete: without it the directory is a partial copy that is never restored from, and the
//! next CreateSnapshot of the same ID (or DeleteSnapshot) replaces it. Snapshot IDs carry the
//! share (see [`spec::snapshot_id`]), so a controller on any node, on an empty state
//! directory, mounts the share from the ID alone to delete a snapshot or restore from it.
//!
//! Like every other path of this backend, everything is reached through descriptors beneath
//! the share root without following symlinks, and a snapshot's deletion removes only the
//! snapshot's own directory. A restore or clone must stay on its source's share: the copy is
//! made inside one filesystem, never across servers.
//!
//! A tree copy cannot be frozen, so shared volumes refuse volume group snapshots (the
//! [`Backend::quiesce`] default), like `dir` volumes; a single snapshot is consistent per file.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use rustix::fs::{AtFlags, Mode, OFlags};

use super::spec::{self, OnDelete, ShareRef};
use super::{META_DIR, SharedBackend, io_at, is_not_found, share_of, tree};
use crate::backend::{
    BackendError, ContentSource, Enforcement, Mechanism, StoredSnapshot, VolumeOptions,
};
use crate::engine::ids::{SnapshotId, VolumeId};

/// Inside the metadata directory, one directory per snapshot.
const SNAPSHOTS: &str = "snapshots";
/// Inside a snapshot's directory: the marker that says it is complete.
const SNAPSHOT_MARKER: &str = "snapshot.json";
/// Inside a snapshot's directory: the copied tree.
const DATA: &str = "data";
/// The engine's prefix of shared snapshot IDs.
const ID_PREFIX: &str = "snap-shared-";

/// What the share records about one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotMarker {
    /// The snapshot ID (must equal the directory's name).
    pub id: String,
    /// The volume it was cut from.
    pub source_volume_id: String,
    /// The source's recorded capacity: the smallest volume it restores into.
    pub size_bytes: u64,
    /// How the data was copied (`reflink` or `copy`).
    pub mechanism: String,
    /// When the copy was complete, seconds since the epoch.
    pub created_unix: u64,
}

/// The share a shared snapshot lives on, from its ID.
fn share_of_snapshot(id: &SnapshotId) -> Result<ShareRef, BackendError> {
    id.as_str()
        .strip_prefix(ID_PREFIX)
        .ok_or_else(|| BackendError::Unsupported(format!("{id} is not a shared snapshot")))
        .and_then(|tail| {
            spec::parse_snapshot_id_tail(tail)
                .map_err(|e| BackendError::Unsupported(format!("snapshot ID {id}: {e}")))
        })
}

fn not_found(op: &'static str, at: &Path, what: &str) -> BackendError {
    BackendError::io(
        op,
        &at.join(what),
        std::io::Error::from(std::io::ErrorKind::NotFound),
    )
}

fn snapshots_path() -> [String; 2] {
    [META_DIR.to_string(), SNAPSHOTS.to_string()]
}

/// `reflink` only when every file was reflinked (an empty tree copies nothing either way).
fn mechanism_of(stats: &tree::CopyStats) -> Mechanism {
    if stats.files > 0 && stats.reflinked == stats.files {
        Mechanism::Reflink
    } else {
        Mechanism::Copy
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

impl SharedBackend {
    /// Opens `.k8scsi/snapshots`; `None` when the share has none.
    fn snapshots_dir(root: BorrowedFd<'_>, at: &Path) -> Result<Option<OwnedFd>, BackendError> {
        match tree::open_dir(root, &snapshots_path()) {
            Ok(fd) => Ok(Some(fd)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(BackendError::io("open snapshot directory", at, e)),
        }
    }

    /// The marker and the data directory of a complete snapshot; `None` when there is none
    /// (absent, or a partial copy without a marker). A marker that does not describe `id` is an
    /// error: we never restore from it.
    fn open_snapshot(
        root: BorrowedFd<'_>,
        id: &SnapshotId,
        at: &Path,
    ) -> Result<Option<(SnapshotMarker, OwnedFd)>, BackendError> {
        let Some(snapshots) = Self::snapshots_dir(root, at)? else {
            return Ok(None);
        };
        let dir = match tree::open_child_dir(snapshots.as_fd(), id.as_str()) {
            Ok(fd) => fd,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(BackendError::io("open snapshot", &at.join(id.as_str()), e)),
        };
        let file = match rustix::fs::openat(
            &dir,
            SNAPSHOT_MARKER,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(f) => f,
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(e) => return Err(BackendError::io("open snapshot marker", at, e.into())),
        };
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(file), &mut text)
            .map_err(io_at("read snapshot marker", at))?;
        let marker: SnapshotMarker = serde_json::from_str(&text).map_err(|e| {
            BackendError::Unsupported(format!(
                "marker of snapshot {id} on the share is corrupt: {e}"
            ))
        })?;
        if marker.id != id.as_str() {
            return Err(BackendError::Unsupported(format!(
                "marker of snapshot {id} on the share describes {:?}; not using it",
                marker.id
            )));
        }
        let data = match tree::open_child_dir(dir.as_fd(), DATA) {
            Ok(fd) => fd,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(BackendError::io("open snapshot data", at, e)),
        };
        Ok(Some((marker, data)))
    }

    /// Cuts a snapshot of `source` into `snapshot` on the volume's share, replacing whatever
    /// an interrupted earlier attempt left there.
    pub(super) fn take_snapshot(
        &self,
        source: &VolumeId,
        snapshot: &SnapshotId,
    ) -> Result<Mechanism, BackendError> {
        let share = share_of(source)?;
        if share_of_snapshot(snapshot)? != share {
            return Err(BackendError::Unsupported(format!(
                "snapshot {snapshot} must live on the share of its volume {source}"
            )));
        }
        self.with_share_ref(&share, false, |root, markers, at| {
            let markers = markers.ok_or_else(|| not_found("snapshot", at, source.as_str()))?;
            let (volume, src) = Self::open_volume(root, markers, source, at)?
                .ok_or_else(|| not_found("snapshot", at, source.as_str()))?;
            let src = src.ok_or_else(|| not_found("snapshot", at, &volume.dir.join("/")))?;
            let (snapshots, _) = tree::make_dirs(root, &snapshots_path(), 0o700)
                .map_err(io_at("create snapshot directory", at))?;
            let name = snapshot.as_str();
            let shown = at.join(META_DIR).join(SNAPSHOTS).join(name);
            // Storage without a record is from an attempt that never answered: start over, so
            // the point in time is this call's.
            tree::remove_tree(snapshots.as_fd(), name).map_err(io_at("remove", &shown))?;
            rustix::fs::mkdirat(&snapshots, name, Mode::from_raw_mode(0o700))
                .map_err(|e| BackendError::io("mkdir", &shown, e.into()))?;
            let result = (|| {
                let dir =
                    tree::open_child_dir(snapshots.as_fd(), name).map_err(io_at("open", &shown))?;
                rustix::fs::mkdirat(&dir, DATA, Mode::from_raw_mode(0o700))
                    .map_err(|e| BackendError::io("mkdir", &shown, e.into()))?;
                let data =
                    tree::open_child_dir(dir.as_fd(), DATA).map_err(io_at("open", &shown))?;
                let stats =
                    tree::copy_tree(src.as_fd(), data.as_fd()).map_err(io_at("copy", &shown))?;
                // Every copied block is on the share before the marker calls it complete.
                rustix::fs::syncfs(&data)
                    .map_err(|e| BackendError::io("syncfs", &shown, e.into()))?;
                let mechanism = mechanism_of(&stats);
                let marker = SnapshotMarker {
                    id: name.to_string(),
                    source_volume_id: source.to_string(),
                    size_bytes: volume.capacity_bytes,
                    mechanism: mechanism.name().to_string(),
                    created_unix: now_unix(),
                };
                let json = serde_json::to_vec_pretty(&marker).expect("markers serialize");
                Self::write_atomically(dir.as_fd(), SNAPSHOT_MARKER, &json, &shown)?;
                rustix::fs::fsync(&snapshots)
                    .map_err(|e| BackendError::io("fsync", &shown, e.into()))?;
                tracing::debug!(snapshot_id = %snapshot, files = stats.files,
                    reflinked = stats.reflinked, bytes_copied = stats.bytes_copied,
                    "shared snapshot copied");
                Ok(mechanism)
            })();
            if result.is_err() {
                let _ = tree::remove_tree(snapshots.as_fd(), name);
            }
            result
        })
    }

    /// Removes a snapshot's directory from its share; absent is success.
    pub(super) fn remove_snapshot(&self, snapshot: &SnapshotId) -> Result<(), BackendError> {
        let share = share_of_snapshot(snapshot)?;
        self.with_share_ref(&share, false, |root, _, at| {
            let Some(snapshots) = Self::snapshots_dir(root, at)? else {
                return Ok(());
            };
            let name = snapshot.as_str();
            let shown = at.join(META_DIR).join(SNAPSHOTS).join(name);
            // The marker goes first, durably: a removal cut short leaves a partial directory
            // that nothing restores from, never a "complete" snapshot with files missing.
            match tree::open_child_dir(snapshots.as_fd(), name) {
                Ok(dir) => {
                    match rustix::fs::unlinkat(&dir, SNAPSHOT_MARKER, AtFlags::empty()) {
                        Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                        Err(e) => return Err(BackendError::io("remove", &shown, e.into())),
                    }
                    rustix::fs::fsync(&dir)
                        .map_err(|e| BackendError::io("fsync", &shown, e.into()))?;
                }
                Err(e) if is_not_found(&e) => return Ok(()),
                Err(e) => return Err(BackendError::io("open", &shown, e)),
            }
            tree::remove_tree(snapshots.as_fd(), name).map_err(io_at("remove", &shown))?;
            rustix::fs::fsync(&snapshots).map_err(|e| BackendError::io("fsync", &shown, e.into()))
        })
    }

    /// What the share says about a complete snapshot.
    pub(super) fn find_snapshot(
        &self,
        snapshot: &SnapshotId,
    ) -> Result<Option<StoredSnapshot>, BackendError> {
        let share = share_of_snapshot(snapshot)?;
        self.with_share_ref(&share, false, |root, _, at| {
            Ok(
                Self::open_snapshot(root, snapshot, at)?.map(|(marker, _)| StoredSnapshot {
                    source_volume_id: marker.source_volume_id,
                    size_bytes: marker.size_bytes,
                }),
            )
        })
    }

    /// Creates volume `id` on its share with the content of `source` (a snapshot or a volume
    /// on the same share).
    pub(super) fn populate(
        &self,
        id: &VolumeId,
        source: ContentSource<'_>,
        options: &VolumeOptions,
    ) -> Result<(Enforcement, Mechanism), BackendError> {
        let share = share_of(id)?;
        let (source_share, source_name) = match source {
            ContentSource::Snapshot(s) => (share_of_snapshot(s)?, format!("snapshot {s}")),
            ContentSource::Volume(v) => (share_of(v)?, format!("volume {v}")),
        };
        if source_share != share {
            return Err(BackendError::Unsupported(format!(
                "{source_name} is on share {:?} but the new volume would be on share {:?}; \
                 a shared volume can only be restored or cloned within its source's share",
                source_share.display(),
                share.display()
            )));
        }
        let (wanted, permissions) = Self::new_marker(id, options)?;
        // While it is being filled the volume's marker says `delete`, whatever its onDelete: a
        // copy cut short (failure or crash) is ours to remove, and the engine's retry deletes
        // it before starting over. The real marker replaces it once the data is complete.
        let filling = super::Marker {
            on_delete: OnDelete::Delete,
            ..wanted.clone()
        };
        self.with_share_ref(&share, true, |root, markers, at| {
            let markers = markers.expect("created on demand");
            // The source first: when it is missing nothing is written.
            let src = match source {
                ContentSource::Snapshot(s) => {
                    Self::open_snapshot(root, s, at)?
                        .ok_or_else(|| not_found("restore", at, s.as_str()))?
                        .1
                }
                ContentSource::Volume(v) => Self::open_volume(root, markers, v, at)?
                    .and_then(|(_, dir)| dir)
                    .ok_or_else(|| not_found("clone", at, v.as_str()))?,
            };
            Self::create_on_share(root, markers, at, filling, permissions)?;
            let shown = at.join(wanted.dir.join("/"));
            let result = (|| {
                let dst = tree::open_dir(root, &wanted.dir).map_err(io_at("open", &shown))?;
                let stats =
                    tree::copy_tree(src.as_fd(), dst.as_fd()).map_err(io_at("copy", &shown))?;
                if let Some(mode) = permissions {
                    // The copy took the source directory's mode; the StorageClass asks for this.
                    rustix::fs::fchmod(&dst, Mode::from_raw_mode(mode))
                        .map_err(|e| BackendError::io("chmod", &shown, e.into()))?;
                }
                rustix::fs::syncfs(&dst)
                    .map_err(|e| BackendError::io("syncfs", &shown, e.into()))?;
                Self::write_marker(markers, &wanted, at)?;
                Ok(mechanism_of(&stats))
            })();
            if result.is_err() {
                let _ = Self::delete_on_share(root, markers, at, id, true);
            }
            result.map(|mechanism| (Enforcement::None, mechanism))
        })
    }
}
