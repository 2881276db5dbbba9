//! The `dir` backend: each volume is a directory `<data-dir>/volumes/<volume-id>`.
//!
//! Capacity is enforced when the data directory is on btrfs: each volume is then a subvolume
//! with a qgroup limit (see [`super::btrfs`]). Elsewhere (ext4 and XFS without project quota
//! support in this build) a volume can only be created when the StorageClass opts out of
//! enforcement with `enforceCapacity: "false"`; its size is then recorded, not enforced. Usage of
//! unenforced volumes is measured by walking the tree without crossing into other filesystems or
//! following symlinks.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::Cancel;
use super::{
    Backend, BackendError, ContentSource, Enforcement, FsCapacity, Mechanism, Usage, VolumeOptions,
    btrfs, projquota, snapcopy, trash::Trash,
};
use crate::engine::ids::{SnapshotId, VolumeId};
use crate::engine::types::{AccessType, Capability};

/// Mode of a new volume's root: writable by any pod user, as Kubernetes expects of a fresh
/// volume when no fsGroup is set. The data directory above it is 0700 and root-owned, so the
/// volume is reachable only through its mounts.
const VOLUME_DIR_MODE: u32 = 0o777;

/// Node-local directories.
#[derive(Debug, Clone)]
pub struct DirBackend {
    volumes: PathBuf,
    /// `<data-dir>/snapshots`: one directory (or read-only subvolume) per snapshot, on the
    /// same filesystem as the volumes so snapshots can share their extents.
    snapshots: PathBuf,
    /// How this node can enforce volume sizes, detected at start.
    enforcement: Enforcement,
    /// Why enforcement is unavailable, for error messages.
    unenforceable_reason: String,
    /// Where deleted plain directories go to be removed in the background (`None` where
    /// volumes are subvolumes or carry quotas, and in the read-only view).
    trash: Option<Arc<Trash>>,
}

impl DirBackend {
    /// Prepares `<data_dir>/volumes` (mode 0700).
    pub fn new(data_dir: &Path) -> Result<DirBackend, BackendError> {
        let volumes = data_dir.join("volumes");
        super::private_dir(&volumes)?;
        let snapshots = prepare_snapshots_dir(data_dir)?;
        let (enforcement, unenforceable_reason) = detect_enforcement(&volumes);
        match enforcement {
            Enforcement::BtrfsQgroup => tracing::info!(
                data_dir = %data_dir.display(),
                "capacity enforcement: btrfs subvolumes with qgroup limits"
            ),
            Enforcement::ProjectQuota => tracing::info!(
                data_dir = %data_dir.display(),
                "capacity enforcement: ext4/XFS project quotas"
            ),
            Enforcement::None | Enforcement::LoopImage => tracing::warn!(
                data_dir = %data_dir.display(),
                reason = %unenforceable_reason,
                "capacity enforcement unavailable; only StorageClasses with enforceCapacity: \"false\" can provision"
            ),
        }
        let trash = match enforcement {
            Enforcement::None => Some(Trash::start(data_dir).map_err(|e| {
                BackendError::io("prepare", &data_dir.join(super::trash::TRASH_DIR), e)
            })?),
            _ => None,
        };
        Ok(DirBackend {
            volumes,
            snapshots,
            enforcement,
            unenforceable_reason,
            trash,
        })
    }

    /// How volume sizes are enforced on this node.
    pub fn enforcement(&self) -> Enforcement {
        self.enforcement
    }

    /// The backend over an existing data directory, without creating or changing anything (for
    /// the operator's read-only commands).
    pub fn at(data_dir: &Path) -> DirBackend {
        let volumes = data_dir.join("volumes");
        let (enforcement, unenforceable_reason) = if btrfs::is_btrfs(&volumes) {
            (Enforcement::BtrfsQgroup, String::new())
        } else {
            (Enforcement::None, "not on btrfs".to_string())
        };
        DirBackend {
            volumes,
            snapshots: data_dir.join(SNAPSHOTS_DIR),
            enforcement,
            unenforceable_reason,
            trash: None,
        }
    }
}

/// Name of the snapshots directory inside the data directory (shared by the backends: their
/// snapshot IDs name the backend, so entries never collide).
pub const SNAPSHOTS_DIR: &str = "snapshots";

/// Suffix of a snapshot copy still being made; a crash leaves it behind for recovery to remove.
pub const PARTIAL_SUFFIX: &str = ".partial";

/// Prepares `<data_dir>/snapshots` (mode 0700).
pub fn prepare_snapshots_dir(data_dir: &Path) -> Result<PathBuf, BackendError> {
    let dir = data_dir.join(SNAPSHOTS_DIR);
    super::private_dir(&dir)?;
    Ok(dir)
}

/// Removes a snapshot directory or subvolume (absent is success).
fn remove_dir_or_subvolume(path: &Path) -> Result<(), BackendError> {
    if btrfs::is_subvolume(path) {
        return btrfs::delete_subvolume(path);
    }
    snapcopy::remove_tree(path)
}

impl DirBackend {
    fn snapshot_path(&self, snapshot: &SnapshotId) -> PathBuf {
        self.snapshots.join(snapshot.as_str())
    }
}

impl Backend for DirBackend {
    fn name(&self) -> &'static str {
        "dir"
    }

    fn can_enforce_capacity(&self) -> bool {
        self.enforcement != Enforcement::None
    }

    fn check_capability(&self, capability: &Capability) -> Result<(), String> {
        if let AccessType::Block = capability.access_type {
            return Err("block access is not supported by directory volumes".to_string());
        }
        if !capability.access_mode.is_single_node() {
            return Err(format!(
                "access mode {} is not supported: directory volumes live on one node",
                capability.access_mode.name()
            ));
        }
        if let AccessType::Mount { mount_flags, .. } = &capability.access_type {
            let options = crate::mount::MountOptions::from_flags(mount_flags, false)?;
            if let Some(flag) = options.filesystem_wide_flag() {
                return Err(format!(
                    "mount flag {flag:?} is not supported by directory volumes: it applies to a \
                     whole filesystem, and a directory volume is a bind mount of the data \
                     directory's (use type: loop for a filesystem of the volume's own)"
                ));
            }
        }
        Ok(())
    }

    fn create(&self, id: &VolumeId, options: &VolumeOptions) -> Result<Enforcement, BackendError> {
        let path = self.volume_path(id);
        if self.enforcement == Enforcement::BtrfsQgroup {
            if !btrfs::is_subvolume(&path) {
                if path.exists() || path.is_symlink() {
                    return Err(BackendError::io(
                        "create",
                        &path,
                        std::io::Error::other("exists and is not a btrfs subvolume"),
                    ));
                }
                btrfs::create_subvolume(&path)?;
                // Nothing records it yet: a failure below must not leave it behind.
                let limited = (|| {
                    if options.capacity_bytes > 0 {
                        btrfs::set_limit(&path, options.capacity_bytes)?;
                    }
                    set_volume_mode(&path)
                })();
                if let Err(e) = limited {
                    let _ = btrfs::delete_subvolume(&path);
                    return Err(e);
                }
                return Ok(Enforcement::BtrfsQgroup);
            }
            if options.capacity_bytes > 0 {
                btrfs::set_limit(&path, options.capacity_bytes)?;
            }
            set_volume_mode(&path)?;
            return Ok(Enforcement::BtrfsQgroup);
        }
        let quota = match self.enforcement {
            Enforcement::ProjectQuota => {
                Some(projquota::detect(&self.volumes).ok_or_else(|| {
                    BackendError::Unenforceable(format!(
                        "project quotas are no longer enabled on the filesystem of {}",
                        self.volumes.display()
                    ))
                })?)
            }
            _ => None,
        };
        if quota.is_none() && options.require_enforcement {
            return Err(BackendError::Unenforceable(format!(
                "capacity cannot be enforced in {}: {}; put the data directory on btrfs, or set \
                 the StorageClass parameter enforceCapacity: \"false\" to accept volumes whose \
                 size is recorded but not enforced",
                self.volumes.display(),
                self.unenforceable_reason
            )));
        }
        match std::fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // Left by an interrupted create of the same name: adopt it, but only if it is
                // a real directory (not a symlink someone planted).
                let meta = std::fs::symlink_metadata(&path)
                    .map_err(|e| BackendError::io("stat", &path, e))?;
                if !meta.is_dir() {
                    return Err(BackendError::io(
                        "create",
                        &path,
                        std::io::Error::other("exists and is not a directory"),
                    ));
                }
            }
            Err(e) => return Err(BackendError::io("mkdir", &path, e)),
        }
        set_volume_mode(&path)?;
        if let Some(quota) = &quota {
            if options.capacity_bytes > 0 {
                projquota::set_limit(quota, id, &path, options.capacity_bytes)?;
            }
            return Ok(Enforcement::ProjectQuota);
        }
        Ok(Enforcement::None)
    }

    fn expand(&self, id: &VolumeId, capacity_bytes: u64) -> Result<(), BackendError> {
        let path = self.volume_path(id);
        if btrfs::is_subvolume(&path) {
            btrfs::set_limit(&path, capacity_bytes)?;
        } else if self.enforcement == Enforcement::ProjectQuota
            && let Some(quota) = projquota::detect(&self.volumes)
        {
            projquota::set_limit(&quota, id, &path, capacity_bytes)?;
        }
        // Unenforced directories have nothing to grow: the new size is recorded by the engine.
        Ok(())
    }

    fn restore_limit(
        &self,
        id: &VolumeId,
        enforcement: &str,
        capacity_bytes: u64,
    ) -> Result<bool, BackendError> {
        let path = self.volume_path(id);
        if enforcement != Enforcement::BtrfsQgroup.name()
            || capacity_bytes == 0
            || !btrfs::is_subvolume(&path)
        {
            return Ok(false);
        }
        if self.enforcement != Enforcement::BtrfsQgroup {
            return Err(BackendError::Unenforceable(
                self.unenforceable_reason.clone(),
            ));
        }
        if btrfs::usage(&path)?.1.is_some() {
            return Ok(false);
        }
        btrfs::set_limit(&path, capacity_bytes)?;
        Ok(true)
    }

    fn delete(&self, id: &VolumeId) -> Result<(), BackendError> {
        let path = self.volume_path(id);
        if btrfs::is_subvolume(&path) {
            return btrfs::delete_subvolume(&path);
        }
        if self.enforcement == Enforcement::ProjectQuota
            && path.exists()
            && let Some(quota) = projquota::detect(&self.volumes)
            && let Err(e) = projquota::clear_limit(&quota, id, &path)
        {
            // The directory goes anyway; a stale limit on an unused project costs nothing.
            tracing::warn!(volume_id = %id, error = %e, "could not clear the project quota");
        }
        // Most deleted volumes are empty or nearly so: try a plain rmdir before walking.
        match std::fs::remove_dir(&path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(_) => {}
        }
        // Never follows symlinks inside the tree, and does not recurse (a pod's tree may be
        // nested deeper than any thread's stack).
        snapcopy::remove_tree(&path)
    }

    fn creates_inline(&self) -> bool {
        // A plain directory: statfs, mkdir and chmod on the data directory.
        self.enforcement == Enforcement::None
    }

    fn delete_inline(&self, id: &VolumeId) -> Option<Result<(), BackendError>> {
        let trash = self.trash.as_ref()?;
        let path = self.volume_path(id);
        match trash.put(&path) {
            Ok(_) => Some(Ok(())),
            // A mount point (EBUSY) or anything unexpected: the bounded slow path decides.
            Err(e) => {
                tracing::debug!(volume_id = %id, error = %e, "cannot move the volume to the trash");
                None
            }
        }
    }

    fn trash_backlog(&self) -> (usize, usize) {
        self.trash.as_ref().map(|t| t.backlog()).unwrap_or_default()
    }

    fn exists(&self, id: &VolumeId) -> Result<bool, BackendError> {
        let path = self.volume_path(id);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) => Ok(meta.is_dir()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(BackendError::io("stat", &path, e)),
        }
    }

    fn volume_path(&self, id: &VolumeId) -> PathBuf {
        self.volumes.join(id.as_str())
    }

    fn sync_dirs(&self) -> Vec<PathBuf> {
        vec![self.volumes.clone()]
    }

    fn capacity(&self) -> Result<FsCapacity, BackendError> {
        FsCapacity::of(&self.volumes)
    }

    fn usage(&self, id: &VolumeId) -> Result<Usage, BackendError> {
        let root = self.volume_path(id);
        if btrfs::is_subvolume(&root) {
            // The qgroup's referenced bytes are what the limit is checked against.
            let (used_bytes, _) = btrfs::usage(&root)?;
            return Ok(Usage {
                used_bytes,
                used_inodes: count_inodes(&root)?,
            });
        }
        measure(&root)
    }

    fn supports_snapshots(&self) -> bool {
        true
    }

    fn snapshot(
        &self,
        source: &VolumeId,
        snapshot: &SnapshotId,
        cancel: &Cancel,
    ) -> Result<Mechanism, BackendError> {
        self.take_snapshot(source, snapshot, cancel)
    }

    fn snapshot_is_instant(&self, source: &VolumeId) -> bool {
        btrfs::is_subvolume(&self.volume_path(source)) || snapcopy::can_reflink(&self.snapshots)
    }

    fn delete_snapshot(&self, snapshot: &SnapshotId) -> Result<(), BackendError> {
        let path = self.snapshot_path(snapshot);
        if btrfs::is_subvolume(&path) {
            return btrfs::delete_subvolume(&path); // atomic
        }
        // A copied tree is removed file by file: it first takes the name of an interrupted
        // copy, which recovery removes, so a crash or an I/O error part-way never leaves a
        // partly deleted tree under the snapshot's name (a record still says it is ready).
        let doomed = self.snapshots.join(format!("{snapshot}{PARTIAL_SUFFIX}"));
        remove_dir_or_subvolume(&doomed)?; // an earlier attempt's
        match std::fs::rename(&path, &doomed) {
            Ok(()) => std::fs::File::open(&self.snapshots)
                .and_then(|dir| dir.sync_all())
                .map_err(|e| BackendError::io("fsync", &self.snapshots, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(BackendError::io("rename", &path, e)),
        }
        remove_dir_or_subvolume(&doomed)
    }

    fn snapshot_exists(&self, snapshot: &SnapshotId) -> Result<bool, BackendError> {
        let path = self.snapshot_path(snapshot);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) => Ok(meta.is_dir()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(BackendError::io("stat", &path, e)),
        }
    }

    fn list_snapshots(&self) -> Result<Vec<SnapshotId>, BackendError> {
        let entries = std::fs::read_dir(&self.snapshots)
            .map_err(|e| BackendError::io("readdir", &self.snapshots, e))?;
        Ok(entries
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| SnapshotId::parse(n).ok())
            })
            .filter(|id| id.backend() == self.name())
            .collect())
    }

    fn snapshot_sync_dirs(&self) -> Vec<PathBuf> {
        vec![self.snapshots.clone()]
    }

    fn create_from(
        &self,
        id: &VolumeId,
        source: ContentSource<'_>,
        options: &VolumeOptions,
    ) -> Result<(Enforcement, Mechanism), BackendError> {
        self.populate(id, source, options)
    }

    fn recover_snapshots(&self) -> Result<(), BackendError> {
        let entries = std::fs::read_dir(&self.snapshots)
            .map_err(|e| BackendError::io("readdir", &self.snapshots, e))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(PARTIAL_SUFFIX))
                .and_then(|n| SnapshotId::parse(n).ok())
            else {
                continue;
            };
            if id.backend() == self.name() {
                tracing::warn!(snapshot_id = %id, "removing a snapshot copy interrupted by a crash");
                remove_dir_or_subvolume(&entry.path())?;
            }
        }
        Ok(())
    }

    fn list(&self) -> Result<Vec<VolumeId>, BackendError> {
        let entries = std::fs::read_dir(&self.volumes)
            .map_err(|e| BackendError::io("readdir", &self.volumes, e))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| BackendError::io("readdir", &self.volumes, e))?;
            match entry.file_name().to_str().map(VolumeId::parse) {
                Some(Ok(id)) => out.push(id),
                _ => tracing::warn!(
                    path = %entry.path().display(),
                    "unexpected entry in the volumes directory; leaving it alone"
                ),
            }
        }
        Ok(out)
    }
}

impl DirBackend {
    /// The snapshot methods of [`Backend`], kept apart for readability.
    fn take_snapshot(
        &self,
        source: &VolumeId,
        snapshot: &SnapshotId,
        cancel: &Cancel,
    ) -> Result<Mechanism, BackendError> {
        let src = self.volume_path(source);
        let dst = self.snapshot_path(snapshot);
        let partial = self.snapshots.join(format!("{snapshot}{PARTIAL_SUFFIX}"));
        remove_dir_or_subvolume(&partial)?;
        remove_dir_or_subvolume(&dst)?;
        if btrfs::is_subvolume(&src) {
            // Atomic: the read-only snapshot is the subvolume as of one btrfs transaction.
            btrfs::snapshot_subvolume(&src, &dst, true)?;
            snapcopy::sync_filesystem(&self.snapshots)?;
            return Ok(Mechanism::BtrfsSnapshot);
        }
        if !self.exists(source)? {
            return Err(BackendError::io(
                "snapshot",
                &src,
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ));
        }
        std::fs::create_dir(&partial).map_err(|e| BackendError::io("mkdir", &partial, e))?;
        let copied = snapcopy::copy_tree(&src, &partial, cancel).and_then(|mechanism| {
            std::fs::rename(&partial, &dst).map_err(|e| BackendError::io("rename", &partial, e))?;
            Ok(mechanism)
        });
        if copied.is_err() {
            let _ = snapcopy::remove_tree(&partial);
        }
        copied
    }

    fn populate(
        &self,
        id: &VolumeId,
        source: ContentSource<'_>,
        options: &VolumeOptions,
    ) -> Result<(Enforcement, Mechanism), BackendError> {
        let src = match source {
            ContentSource::Snapshot(s) => self.snapshot_path(s),
            ContentSource::Volume(v) => self.volume_path(v),
        };
        let dst = self.volume_path(id);
        if btrfs::is_subvolume(&src) && self.enforcement == Enforcement::BtrfsQgroup {
            btrfs::snapshot_subvolume(&src, &dst, false)?;
            let result = (|| {
                if options.capacity_bytes > 0 {
                    btrfs::set_limit(&dst, options.capacity_bytes)?;
                }
                snapcopy::sync_filesystem(&dst)
            })();
            if let Err(e) = result {
                let _ = btrfs::delete_subvolume(&dst);
                return Err(e);
            }
            return Ok((Enforcement::BtrfsQgroup, Mechanism::BtrfsSnapshot));
        }
        let meta =
            std::fs::symlink_metadata(&src).map_err(|e| BackendError::io("stat", &src, e))?;
        if !meta.is_dir() {
            return Err(BackendError::io(
                "restore",
                &src,
                std::io::Error::other("not a directory"),
            ));
        }
        // An empty volume with the requested enforcement, then the content: files created
        // inside a quota-limited directory are charged to it as they are copied.
        let enforcement = self.create(id, options)?;
        match snapcopy::copy_tree(&src, &dst, Cancel::never()) {
            Ok(mechanism) => Ok((enforcement, mechanism)),
            Err(e) => {
                let _ = self.delete(id);
                Err(e)
            }
        }
    }
}

/// Detects how this node can enforce sizes under `volumes`, and why not when it cannot.
fn detect_enforcement(volumes: &Path) -> (Enforcement, String) {
    if btrfs::is_btrfs(volumes) {
        match btrfs::enable_quota(volumes) {
            Ok(()) => return (Enforcement::BtrfsQgroup, String::new()),
            Err(e) => {
                return (
                    Enforcement::None,
                    format!("btrfs quota cannot be enabled: {e}"),
                );
            }
        }
    }
    if projquota::detect(volumes).is_some() {
        return (Enforcement::ProjectQuota, String::new());
    }
    let fs = rustix::fs::statfs(volumes)
        .map(|st| format!("filesystem type {:#x}", st.f_type))
        .unwrap_or_else(|e| format!("statfs failed: {e}"));
    (
        Enforcement::None,
        format!(
            "the data directory is neither on btrfs nor on ext4/XFS mounted with project \
             quotas (prjquota) ({fs})"
        ),
    )
}

/// Explicit chmod: the process umask must not decide what pods can write.
fn set_volume_mode(path: &Path) -> Result<(), BackendError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(VOLUME_DIR_MODE))
        .map_err(|e| BackendError::io("chmod", path, e))
}

/// Counts inodes under `root` (itself included) on its own filesystem.
fn count_inodes(root: &Path) -> Result<u64, BackendError> {
    Ok(measure(root)?.used_inodes)
}

/// Bytes and inodes used under `root` (itself included) on its own filesystem, hard links
/// counted once. The walk goes through directory descriptors and never follows a symlink, so a
/// pod swapping a directory for a symlink while it runs cannot make it count anything outside.
fn measure(root: &Path) -> Result<Usage, BackendError> {
    let dir = rustix::fs::open(
        root,
        rustix::fs::OFlags::RDONLY
            | rustix::fs::OFlags::DIRECTORY
            | rustix::fs::OFlags::NOFOLLOW
            | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| BackendError::io("open", root, e.into()))?;
    super::shared::tree::usage(std::os::fd::AsFd::as_fd(&dir))
        .map_err(|e| BackendError::io("measure", root, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNENFORCED: VolumeOptions = VolumeOptions {
        capacity_bytes: 0,
        require_enforcement: false,
        block: false,
        fs_type: String::new(),
        preallocate: false,
        name: String::new(),
        parameters: std::collections::BTreeMap::new(),
        metadata: std::collections::BTreeMap::new(),
    };

    #[test]
    fn create_is_idempotent_and_usage_counts_files() {
        let data = tempfile::tempdir().unwrap();
        let backend = DirBackend::new(data.path()).unwrap();
        let id = VolumeId::for_name(backend.name(), "pvc-1");
        backend.create(&id, &UNENFORCED).unwrap();
        backend.create(&id, &UNENFORCED).unwrap();
        assert!(backend.exists(&id).unwrap());
        let path = backend.volume_path(&id);
        std::fs::write(path.join("a"), vec![7u8; 64 * 1024]).unwrap();
        std::fs::hard_link(path.join("a"), path.join("b")).unwrap();
        let usage = backend.usage(&id).unwrap();
        assert!(usage.used_bytes >= 64 * 1024, "{usage:?}");
        assert_eq!(
            usage.used_inodes, 2,
            "root + one file (hard link counted once)"
        );
        assert_eq!(backend.list().unwrap(), vec![id.clone()]);
        backend.delete(&id).unwrap();
        backend.delete(&id).unwrap();
        assert!(!backend.exists(&id).unwrap());
    }

    #[test]
    fn refuses_to_adopt_a_symlink() {
        let data = tempfile::tempdir().unwrap();
        let backend = DirBackend::new(data.path()).unwrap();
        let id = VolumeId::for_name(backend.name(), "pvc-2");
        std::os::unix::fs::symlink("/etc", backend.volume_path(&id)).unwrap();
        assert!(backend.create(&id, &UNENFORCED).is_err());
        assert!(!backend.exists(&id).unwrap());
    }

    #[test]
    fn usage_does_not_follow_a_directory_swapped_for_a_symlink() {
        let data = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        for i in 0..1000 {
            std::fs::write(outside.path().join(i.to_string()), b"").unwrap();
        }
        let backend = DirBackend::new(data.path()).unwrap();
        let id = VolumeId::for_name(backend.name(), "pvc-3");
        backend.create(&id, &UNENFORCED).unwrap();
        let path = backend.volume_path(&id);
        std::fs::create_dir(path.join("sub")).unwrap();
        std::fs::write(path.join("sub/x"), b"").unwrap();
        std::os::unix::fs::symlink(outside.path(), path.join("link")).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let swapper = {
            let (stop, path) = (stop.clone(), path.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = rustix::fs::renameat_with(
                        rustix::fs::CWD,
                        path.join("sub").as_path(),
                        rustix::fs::CWD,
                        path.join("link").as_path(),
                        rustix::fs::RenameFlags::EXCHANGE,
                    );
                }
            })
        };
        let mut worst = 0;
        for _ in 0..2000 {
            if let Ok(usage) = backend.usage(&id) {
                worst = worst.max(usage.used_inodes);
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        swapper.join().unwrap();
        // Root, the directory (at most twice, seen under both names), its file, the symlink.
        assert!(worst <= 6, "counted {worst} inodes: followed the symlink");
    }
}
