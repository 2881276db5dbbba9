//! Where volume data lives. The engine knows backends only through [`Backend`]; each backend
//! owns a subtree of the data directory and maps volume IDs to storage inside it.

pub mod btrfs;
pub mod dir;
pub mod freeze;
pub mod loopctl;
pub mod loopdev;
pub mod loopvol;
pub mod projquota;
pub mod shared;
pub mod snapcopy;
pub mod trash;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::engine::ids::{SnapshotId, VolumeId};
use crate::engine::types::{AccessType, Capability};
use crate::mount::{ConfinedPath, MountError, MountOptions, Mounter, PathState};
pub use snapcopy::Cancel;

/// Failures of a backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A filesystem operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An external tool (btrfs, mkfs, ...) failed.
    #[error("{command} {path}: {stderr}")]
    Command {
        command: String,
        path: PathBuf,
        stderr: String,
    },
    /// The volume needs capacity enforcement this node cannot provide.
    #[error("{0}")]
    Unenforceable(String),
    /// The operation is not possible for this volume (e.g. shrinking).
    #[error("{0}")]
    Unsupported(String),
    /// The storage the request needs is taken by something else (another volume's directory,
    /// data we did not create).
    #[error("{0}")]
    Conflict(String),
    /// Mounting or unmounting failed.
    #[error(transparent)]
    Mount(#[from] MountError),
}

impl BackendError {
    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        BackendError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    /// Whether the failure means the filesystem is out of space or inodes.
    pub fn is_out_of_space(&self) -> bool {
        match self {
            BackendError::Io { source, .. } => {
                matches!(source.raw_os_error(), Some(28) | Some(122)) // ENOSPC, EDQUOT
            }
            BackendError::Command { stderr, .. } => {
                stderr.contains("No space left") || stderr.contains("Disk quota exceeded")
            }
            _ => false,
        }
    }
}

/// Space of the filesystem a backend allocates from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsCapacity {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
}

impl FsCapacity {
    /// Space and inodes of the filesystem holding `path`, as an unprivileged user sees them
    /// (blocks reserved for root are not available to volumes).
    pub fn of(path: &Path) -> Result<FsCapacity, BackendError> {
        let st =
            rustix::fs::statvfs(path).map_err(|e| BackendError::io("statvfs", path, e.into()))?;
        Ok(FsCapacity {
            total_bytes: st.f_blocks.saturating_mul(st.f_frsize),
            available_bytes: st.f_bavail.saturating_mul(st.f_frsize),
            total_inodes: st.f_files,
            free_inodes: st.f_favail,
        })
    }
}

/// Usage of one volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub used_bytes: u64,
    pub used_inodes: u64,
}

/// What a new volume must be, as far as its storage is concerned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeOptions {
    /// Requested size in bytes (0 = unspecified).
    pub capacity_bytes: u64,
    /// Whether creation must fail when the size cannot be enforced.
    pub require_enforcement: bool,
    /// A raw block volume rather than a filesystem.
    pub block: bool,
    /// Filesystem type from the mount capability (empty: the backend's default).
    pub fs_type: String,
    /// Allocate the storage up front instead of thinly.
    pub preallocate: bool,
    /// The volume's CSI name.
    pub name: String,
    /// The StorageClass parameters that define the volume (backend-specific ones included).
    pub parameters: BTreeMap<String, String>,
    /// The provisioner's metadata (PV and PVC names).
    pub metadata: BTreeMap<String, String>,
}

/// How a volume's capacity is enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforcement {
    /// A btrfs subvolume with a qgroup limit.
    BtrfsQgroup,
    /// An ext4/XFS project quota on the volume's directory.
    ProjectQuota,
    /// A fixed-size image file.
    LoopImage,
    /// Not enforced: the size is recorded only.
    None,
}

impl Enforcement {
    /// The name recorded and reported (`btrfs-qgroup`, `none`).
    pub fn name(self) -> &'static str {
        match self {
            Enforcement::BtrfsQgroup => "btrfs-qgroup",
            Enforcement::ProjectQuota => "project-quota",
            Enforcement::LoopImage => "image-size",
            Enforcement::None => "none",
        }
    }
}

/// How a snapshot or a clone got its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// A btrfs subvolume snapshot (read-only for snapshots, writable for volumes): O(1).
    BtrfsSnapshot,
    /// Shared extents (`FICLONE`) of every file: O(extents), no data copied.
    Reflink,
    /// A full copy that keeps holes, links and metadata.
    Copy,
}

impl Mechanism {
    /// The name recorded and logged.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::BtrfsSnapshot => "btrfs-snapshot",
            Mechanism::Reflink => "reflink",
            Mechanism::Copy => "copy",
        }
    }
}

/// A snapshot as its storage describes it (see [`Backend::stored_snapshot`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSnapshot {
    /// The volume it was cut from.
    pub source_volume_id: String,
    /// The source's capacity when it was cut: the smallest volume it restores into.
    pub size_bytes: u64,
}

/// Where a new volume's content comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentSource<'a> {
    Snapshot(&'a SnapshotId),
    Volume(&'a VolumeId),
}

/// What NodePublishVolume binds at a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishSource {
    /// A directory: the volume's own, or where its filesystem is staged.
    Directory(PathBuf),
    /// A block device node, bound onto a file at the target.
    Device(PathBuf),
}

impl PublishSource {
    pub fn path(&self) -> &Path {
        match self {
            PublishSource::Directory(p) | PublishSource::Device(p) => p,
        }
    }
}

/// A place volumes are created in.
pub trait Backend: Send + Sync + 'static {
    /// The backend's name in StorageClass parameters, volume IDs and records (`dir`).
    fn name(&self) -> &'static str;

    /// Whether this node can enforce volume sizes.
    fn can_enforce_capacity(&self) -> bool;

    /// The smallest volume this backend can make (reported as GetCapacity's
    /// `minimum_volume_size`).
    fn minimum_volume_bytes(&self) -> u64 {
        0
    }

    /// The smallest volume of the kind `options` asks for that this backend can make (an xfs
    /// loop image needs 300 MiB). The engine grows a smaller request to it when the request's
    /// limit allows, and answers OUT_OF_RANGE when it does not.
    fn smallest_volume_bytes(&self, _options: &VolumeOptions) -> u64 {
        0
    }

    /// The unit volume sizes are made in: a volume's size is rounded up to a multiple of it
    /// (within the request's limit) before it is made and recorded, so the storage is never
    /// smaller than the recorded, answered size. 1 where any size is exact.
    fn size_unit(&self) -> u64 {
        1
    }

    /// The size of a volume created without a capacity range (0: none, the volume has no
    /// size of its own). The engine records and reports it, and checks it against the
    /// filesystem's space, as if the CO had asked for it.
    fn default_volume_bytes(&self) -> u64 {
        0
    }

    /// Whether a volume lives on one node (and is reported with that node's topology); `false`
    /// for storage every node can reach.
    fn node_local(&self) -> bool {
        true
    }

    /// Whether [`Backend::list`] sees all storage, so reconciliation may call a record without
    /// listed storage "missing".
    fn enumerable(&self) -> bool {
        true
    }

    /// The ID the volume `name` gets with these (already checked) parameters and the
    /// capability's mount flags. By default derived from the name alone.
    fn volume_id(
        &self,
        name: &str,
        _parameters: &BTreeMap<String, String>,
        _mount_flags: &[String],
    ) -> Result<VolumeId, BackendError> {
        Ok(VolumeId::for_name(self.name(), name))
    }

    /// Space a volume with these parameters would be allocated from; by default
    /// [`Backend::capacity`].
    fn capacity_for(
        &self,
        _parameters: &BTreeMap<String, String>,
        _mount_flags: &[String],
    ) -> Result<FsCapacity, BackendError> {
        self.capacity()
    }

    /// Space the existing volume `id` grows into; by default [`Backend::capacity`].
    fn capacity_of(&self, _id: &VolumeId) -> Result<FsCapacity, BackendError> {
        self.capacity()
    }

    /// The options of the bind mount NodePublishVolume makes, from the capability's mount
    /// flags; `Err` says which flag is refused.
    fn publish_options(&self, flags: &[String], readonly: bool) -> Result<MountOptions, String> {
        MountOptions::from_flags(flags, readonly)
    }

    /// Whether volumes of this backend can be used with `capability`; `Err` says why not.
    fn check_capability(&self, capability: &Capability) -> Result<(), String>;

    /// Whether volumes of this backend differ in what capabilities they take (see
    /// [`Backend::check_volume_capability`]); when not, the node calls and expansions skip that
    /// check and the trip to a blocking thread it costs.
    fn volumes_differ(&self) -> bool {
        false
    }

    /// Whether the existing volume `id` is what `capability` asks for: raw block or a
    /// filesystem, and which filesystem; `Err` says why not. Checked for a repeated
    /// CreateVolume, ValidateVolumeCapabilities, NodeStageVolume and NodePublishVolume, after
    /// [`Backend::check_capability`]. By default every volume of a backend is alike; a volume
    /// whose storage is missing cannot be told apart either.
    fn check_volume_capability(
        &self,
        id: &VolumeId,
        capability: &Capability,
    ) -> Result<(), String> {
        let _ = (id, capability);
        Ok(())
    }

    /// Creates the storage for `id` and says how its size is enforced. Must be idempotent:
    /// storage left by an interrupted earlier attempt for the same ID is adopted.
    fn create(&self, id: &VolumeId, options: &VolumeOptions) -> Result<Enforcement, BackendError>;

    /// Grows the volume's storage to `capacity_bytes` (never shrinks).
    fn expand(&self, id: &VolumeId, capacity_bytes: u64) -> Result<(), BackendError>;

    /// Puts back the size limit of a volume recorded as enforced by `enforcement` when the
    /// filesystem has lost it (turning btrfs quota off and on again drops every qgroup limit);
    /// `Ok(true)` when it had to. An error means the size is not enforced now. A limit that is
    /// there is left alone, even if it differs (an expansion whose record did not commit).
    fn restore_limit(
        &self,
        _id: &VolumeId,
        _enforcement: &str,
        _capacity_bytes: u64,
    ) -> Result<bool, BackendError> {
        Ok(false)
    }

    /// Whether a grown volume also needs NodeExpandVolume (device and filesystem).
    fn node_expansion_required(&self) -> bool {
        false
    }

    /// Removes the storage of `id`; absent storage is success.
    fn delete(&self, id: &VolumeId) -> Result<(), BackendError>;

    /// Whether [`Backend::capacity_for`] and [`Backend::create`] of a volume without a content
    /// source are a few metadata calls on this node's own data directory (no mount, no tool,
    /// nothing inside an existing volume), so the engine may run them on the request's own
    /// thread instead of handing them to a worker thread and back.
    fn creates_inline(&self) -> bool {
        false
    }

    /// Deletes `id`'s storage with one rename of its directory out of the volumes directory,
    /// when this backend can; `None` when it cannot (the storage is a mount point, a subvolume,
    /// has a quota to clear, ...) and [`Backend::delete`] must run on a worker thread. Like
    /// `creates_inline`, it never looks inside the volume, so a hung filesystem mounted there
    /// cannot block the caller.
    fn delete_inline(&self, _id: &VolumeId) -> Option<Result<(), BackendError>> {
        None
    }

    /// Deleted storage still waiting for background removal, and of that what was given up on
    /// until restart (removal failed or hung); `(0, 0)` for backends that remove at once.
    fn trash_backlog(&self) -> (usize, usize) {
        (0, 0)
    }

    /// Removes storage of `id` that has no record: left by a CreateVolume that never answered
    /// (e.g. a restore cut short by a crash), so nobody has used it and the retry makes it
    /// again. Unlike [`Backend::delete`] it does not keep data a retention policy would keep.
    /// By default the same as `delete`.
    fn discard(&self, id: &VolumeId) -> Result<(), BackendError> {
        self.delete(id)
    }

    /// Whether storage for `id` exists.
    fn exists(&self, id: &VolumeId) -> Result<bool, BackendError>;

    /// The directory that is bind-mounted when the volume is published.
    fn volume_path(&self, id: &VolumeId) -> PathBuf;

    /// Directories whose entries change on create/delete; the store fsyncs them in the same
    /// group commit that records the change.
    fn sync_dirs(&self) -> Vec<PathBuf>;

    /// Space of the underlying filesystem.
    fn capacity(&self) -> Result<FsCapacity, BackendError>;

    /// Space and inodes used by one volume.
    fn usage(&self, id: &VolumeId) -> Result<Usage, BackendError>;

    /// IDs of every volume that has storage, for reconciliation.
    fn list(&self) -> Result<Vec<VolumeId>, BackendError>;

    /// Whether NodeStageVolume mounts something at the staging path (otherwise staging only
    /// records the path).
    fn stages_mounts(&self) -> bool {
        false
    }

    /// NodeStageVolume: makes the volume usable on this node at `staging`. Idempotent.
    fn stage(
        &self,
        _id: &VolumeId,
        _access: &AccessType,
        _staging: &ConfinedPath,
        _mounter: &dyn Mounter,
    ) -> Result<(), BackendError> {
        Ok(())
    }

    /// NodeUnstageVolume: undoes [`Backend::stage`]. Idempotent.
    fn unstage(
        &self,
        _id: &VolumeId,
        _staging: &ConfinedPath,
        _mounter: &dyn Mounter,
    ) -> Result<(), BackendError> {
        Ok(())
    }

    /// Whether the mount found at `staging` (`state`, its root's device and inode) is this
    /// volume's staged mount. Backends that stage mounts answer from the volume's own device or
    /// directory, so a mount of anything else (another volume, a kubelet tmpfs) is never
    /// mistaken for this volume's.
    fn shows_staged(
        &self,
        _id: &VolumeId,
        _staging: &ConfinedPath,
        _state: &PathState,
    ) -> Result<bool, BackendError> {
        Ok(false)
    }

    /// Makes ready what a publication binds beyond what staging made (a read-only device for
    /// a read-only publication of a raw block volume). Idempotent; undone by unstaging.
    fn prepare_publish(&self, _id: &VolumeId, _readonly: bool) -> Result<(), BackendError> {
        Ok(())
    }

    /// What NodePublishVolume binds at the target, given where the volume is staged and
    /// whether the publication is read-only. Only looks: [`Backend::prepare_publish`] makes.
    fn publish_source(
        &self,
        id: &VolumeId,
        _staging: Option<&ConfinedPath>,
        _readonly: bool,
    ) -> Result<PublishSource, BackendError> {
        Ok(PublishSource::Directory(self.volume_path(id)))
    }

    /// Space and inodes of the filesystem the volume published at `at` lives on, for
    /// NodeGetVolumeStats; by default [`Backend::capacity`] (a directory volume shares the data
    /// directory's filesystem). A volume with a filesystem of its own (a loop image) or on
    /// another one (a share) answers from the filesystem at `at`.
    fn capacity_at(&self, _id: &VolumeId, _at: &Path) -> Result<FsCapacity, BackendError> {
        self.capacity()
    }

    /// Usage as seen where the volume is published (`at`); defaults to [`Backend::usage`].
    fn usage_at(&self, id: &VolumeId, _at: &Path) -> Result<Usage, BackendError> {
        self.usage(id)
    }

    /// NodeExpandVolume: grows what the node sees (device, filesystem) to the volume's new
    /// size; returns the size now visible, or `None` when there is nothing to do on the node.
    fn node_expand(
        &self,
        _id: &VolumeId,
        _staging: Option<&ConfinedPath>,
    ) -> Result<Option<u64>, BackendError> {
        Ok(None)
    }

    // ----- Snapshots and clones. Backends that cannot take them keep these defaults; the
    // engine advertises the snapshot capabilities when any configured backend can and refuses
    // the others' volumes per request (INVALID_ARGUMENT). -----

    /// Whether this backend implements the methods below.
    fn supports_snapshots(&self) -> bool {
        false
    }

    /// Cuts a snapshot of volume `source` into the snapshot storage `snapshot`, durably, and
    /// says how. The point in time is fixed before this returns. Storage left by an interrupted
    /// earlier attempt is replaced. A copy stops early with an `Interrupted` error, removing
    /// what it made, once `cancel` is set (backends that never copy in the background may
    /// ignore it).
    fn snapshot(
        &self,
        source: &VolumeId,
        snapshot: &SnapshotId,
        cancel: &Cancel,
    ) -> Result<Mechanism, BackendError> {
        let _ = (source, snapshot, cancel);
        Err(BackendError::Unsupported(format!(
            "the {} backend does not take snapshots",
            self.name()
        )))
    }

    /// Whether a snapshot of `source` would be instant (a btrfs snapshot, reflinks) rather than
    /// a full copy of its data, whose time grows with the data. The engine runs full copies of
    /// sources nobody can write to in the background. By default not instant: a backend that
    /// cannot tell is treated as copying.
    fn snapshot_is_instant(&self, source: &VolumeId) -> bool {
        let _ = source;
        false
    }

    /// Makes volume `id` unchanging until the returned guard drops, for a volume group
    /// snapshot (every member is quiesced before any is cut). `None`: nothing to hold (the
    /// volume is not in use). Backends that cannot stop writes refuse.
    fn quiesce(&self, id: &VolumeId) -> Result<Option<freeze::Frozen>, BackendError> {
        let _ = id;
        Err(BackendError::Unsupported(format!(
            "volumes of the {} backend cannot be frozen, so they cannot be part of a volume \
             group snapshot",
            self.name()
        )))
    }

    /// [`Backend::snapshot`] of a volume the caller has already quiesced.
    fn snapshot_quiesced(
        &self,
        source: &VolumeId,
        snapshot: &SnapshotId,
    ) -> Result<Mechanism, BackendError> {
        self.snapshot(source, snapshot, Cancel::never())
    }

    /// Removes a snapshot's storage; absent storage is success.
    fn delete_snapshot(&self, snapshot: &SnapshotId) -> Result<(), BackendError> {
        let _ = snapshot;
        Ok(())
    }

    /// Whether storage for `snapshot` exists.
    fn snapshot_exists(&self, snapshot: &SnapshotId) -> Result<bool, BackendError> {
        let _ = snapshot;
        Ok(false)
    }

    /// What the snapshot's own storage says about it (source volume and size), for storage
    /// that outlives the controller's state directory (a share): a controller on a fresh state
    /// directory restores from it by ID. `None`: no complete snapshot there, or a backend whose
    /// snapshots are known only from the store.
    fn stored_snapshot(
        &self,
        snapshot: &SnapshotId,
    ) -> Result<Option<StoredSnapshot>, BackendError> {
        let _ = snapshot;
        Ok(None)
    }

    /// IDs of every snapshot that has storage, for start-up recovery.
    fn list_snapshots(&self) -> Result<Vec<SnapshotId>, BackendError> {
        Ok(Vec::new())
    }

    /// Directories whose entries change when snapshots are created or deleted.
    fn snapshot_sync_dirs(&self) -> Vec<PathBuf> {
        Vec::new()
    }

    /// Creates volume `id` (which has no storage yet) with the content of `source`, grown to
    /// `options.capacity_bytes` when that is larger, durably. Returns how its size is enforced
    /// and how the content was copied.
    fn create_from(
        &self,
        id: &VolumeId,
        source: ContentSource<'_>,
        options: &VolumeOptions,
    ) -> Result<(Enforcement, Mechanism), BackendError> {
        let _ = (id, source, options);
        Err(BackendError::Unsupported(format!(
            "the {} backend cannot create volumes from snapshots or volumes",
            self.name()
        )))
    }

    /// Start-up recovery after a crash: removes partial snapshot copies and thaws filesystems
    /// a snapshot may have left frozen.
    fn recover_snapshots(&self) -> Result<(), BackendError> {
        Ok(())
    }
}

/// Makes `dir` (and its parents) if needed and sets it to mode 0700: the directories the driver
/// keeps its volumes, images, snapshots and share mounts in are for root alone. Whatever is at
/// `dir` must be a real directory: a symlink there (which the chmod would follow) or a file is
/// refused, naming the path.
pub fn private_dir(dir: &Path) -> Result<(), BackendError> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::symlink_metadata(dir) {
        Ok(meta) if !meta.is_dir() => {
            return Err(BackendError::io(
                "prepare",
                dir,
                std::io::Error::other("exists and is not a directory (a symlink is refused too)"),
            ));
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(|e| BackendError::io("mkdir", dir, e))?;
        }
        Err(e) => return Err(BackendError::io("stat", dir, e)),
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| BackendError::io("chmod", dir, e))
}

#[cfg(test)]
mod private_dir_tests {
    use std::os::unix::fs::PermissionsExt;

    use super::private_dir;

    #[test]
    fn makes_and_tightens_directories_and_refuses_symlinks_and_files() {
        let root = tempfile::tempdir().unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;

        let made = root.path().join("a/b");
        private_dir(&made).unwrap();
        assert_eq!(mode(&made), 0o700);

        let open = root.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        private_dir(&open).unwrap();
        assert_eq!(mode(&open), 0o700);

        let elsewhere = root.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o755)).unwrap();
        let link = root.path().join("link");
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
        let refused = private_dir(&link).unwrap_err().to_string();
        assert!(refused.contains("not a directory"), "{refused}");
        assert_eq!(mode(&elsewhere), 0o755, "the chmod followed the symlink");

        let file = root.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(private_dir(&file).is_err());
    }
}
