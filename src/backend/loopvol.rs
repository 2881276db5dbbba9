//! The `loop` backend: each volume is an image file under `<data-dir>/images`, attached to a
//! loop device on the node that uses it.
//!
//! The image's size is the volume's hard limit, so capacity is always enforced. The file name
//! says what the volume is: `<id>.ext4` and `<id>.xfs` hold a filesystem (formatted at
//! creation, mounted at the staging path by NodeStageVolume, bind-mounted into pods by
//! NodePublishVolume); `<id>.block` is a raw block volume whose loop device node is bound onto
//! the target file. Keeping the kind in the name means the node needs no metadata beyond the
//! file itself to stage, publish or grow a volume after a restart.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::Cancel;
use super::dir::{PARTIAL_SUFFIX, prepare_snapshots_dir};
use super::loopdev::{self, FsType};
use super::{
    Backend, BackendError, ContentSource, Enforcement, FsCapacity, Mechanism, PublishSource, Usage,
    VolumeOptions, freeze, snapcopy,
};
use crate::engine::ids::{SnapshotId, VolumeId};
use crate::engine::types::{AccessType, Capability};
use crate::mount::{ConfinedPath, MountOptions, Mounter, PathState};

/// Size of a volume created without a capacity range.
pub const DEFAULT_BYTES: u64 = 1 << 30;

/// The loop devices' logical sector size; image sizes are whole multiples of it.
const SECTOR_BYTES: u64 = 512;

/// What a loop volume holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Filesystem(FsType),
    Block,
}

impl Kind {
    fn extension(self) -> &'static str {
        match self {
            Kind::Filesystem(fs) => fs.name(),
            Kind::Block => "block",
        }
    }

    fn from_extension(ext: &str) -> Option<Kind> {
        match ext {
            "block" => Some(Kind::Block),
            other => FsType::parse(other)
                .ok()
                .filter(|_| !other.is_empty())
                .map(Kind::Filesystem),
        }
    }
}

/// Loop-device volumes.
#[derive(Debug, Clone)]
pub struct LoopBackend {
    images: PathBuf,
    /// `<data-dir>/snapshots`: `<snapshot-id>.<kind>` image copies, on the same filesystem as
    /// the images so they can be reflinked.
    snapshots: PathBuf,
}

/// Every kind, in the order an image is looked for.
const KINDS: [Kind; 3] = [
    Kind::Filesystem(FsType::Ext4),
    Kind::Filesystem(FsType::Xfs),
    Kind::Block,
];

impl LoopBackend {
    /// Prepares `<data_dir>/images` (mode 0700).
    pub fn new(data_dir: &Path) -> Result<LoopBackend, BackendError> {
        let images = data_dir.join("images");
        super::private_dir(&images)?;
        let snapshots = prepare_snapshots_dir(data_dir)?;
        Ok(LoopBackend { images, snapshots })
    }

    fn snapshot_image(&self, snapshot: &SnapshotId, kind: Kind) -> PathBuf {
        self.snapshots
            .join(format!("{snapshot}.{}", kind.extension()))
    }

    fn find_snapshot(&self, snapshot: &SnapshotId) -> Option<(PathBuf, Kind)> {
        KINDS
            .into_iter()
            .map(|kind| (self.snapshot_image(snapshot, kind), kind))
            .find(|(path, _)| path.is_file())
    }

    /// Makes the image of `id` consistent for the instant of a copy: a mounted filesystem is
    /// frozen (flushed, writes blocked) until the returned guard drops; an attached raw block
    /// device has its cached writes flushed to the image.
    fn quiesce_image(
        &self,
        image: &Path,
        kind: Kind,
    ) -> Result<Option<freeze::Frozen>, BackendError> {
        let Some(device) = loopdev::find_attached(image)? else {
            return Ok(None);
        };
        match kind {
            Kind::Filesystem(_) => match freeze::mount_point_of(&device)? {
                Some(mount_point) => Ok(Some(freeze::freeze(&mount_point)?)),
                None => Ok(None),
            },
            Kind::Block => {
                let fd = snapcopy::open_source(&device)
                    .map_err(|e| BackendError::io("open", &device, e))?;
                rustix::fs::fsync(&fd).map_err(|e| BackendError::io("fsync", &device, e.into()))?;
                Ok(None)
            }
        }
    }

    fn take_snapshot(
        &self,
        source: &VolumeId,
        snapshot: &SnapshotId,
        quiesced: bool,
        cancel: &Cancel,
    ) -> Result<Mechanism, BackendError> {
        let (image, kind) = self.existing(source)?;
        self.remove_snapshot(snapshot)?;
        let dst = self.snapshot_image(snapshot, kind);
        let partial = PathBuf::from(format!("{}{PARTIAL_SUFFIX}", dst.display()));
        let copied = {
            let _frozen = if quiesced {
                None
            } else {
                self.quiesce_image(&image, kind)?
            };
            snapcopy::clone_path(&image, &partial, true, cancel)
        };
        let result = copied.and_then(|mechanism| {
            std::fs::rename(&partial, &dst).map_err(|e| BackendError::io("rename", &partial, e))?;
            Ok(mechanism)
        });
        if result.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        result
    }

    fn remove_snapshot(&self, snapshot: &SnapshotId) -> Result<(), BackendError> {
        for kind in KINDS {
            let path = self.snapshot_image(snapshot, kind);
            for p in [
                PathBuf::from(format!("{}{PARTIAL_SUFFIX}", path.display())),
                path,
            ] {
                match std::fs::remove_file(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(BackendError::io("remove", &p, e)),
                }
            }
        }
        Ok(())
    }

    fn populate(
        &self,
        id: &VolumeId,
        source: ContentSource<'_>,
        options: &VolumeOptions,
    ) -> Result<(Enforcement, Mechanism), BackendError> {
        let (src, kind) = match source {
            ContentSource::Snapshot(s) => self.find_snapshot(s).ok_or_else(|| {
                BackendError::io(
                    "find snapshot",
                    &self.snapshots.join(s.as_str()),
                    std::io::Error::from(std::io::ErrorKind::NotFound),
                )
            })?,
            ContentSource::Volume(v) => self.existing(v)?,
        };
        match kind {
            Kind::Block if !options.block => {
                return Err(BackendError::Unsupported(
                    "the content source is a raw block volume; it cannot populate a filesystem \
                     volume"
                        .into(),
                ));
            }
            Kind::Filesystem(fs) if options.block => {
                return Err(BackendError::Unsupported(format!(
                    "the content source holds {fs}; it cannot populate a raw block volume"
                )));
            }
            Kind::Filesystem(fs) if !options.fs_type.is_empty() && options.fs_type != fs.name() => {
                return Err(BackendError::Unsupported(format!(
                    "the content source holds {fs}, not the requested {}",
                    options.fs_type
                )));
            }
            _ => {}
        }
        let dst = self.image(id, kind);
        let mechanism = {
            let _frozen = match source {
                ContentSource::Volume(_) => self.quiesce_image(&src, kind)?,
                ContentSource::Snapshot(_) => None, // snapshots never change
            };
            // A preallocated volume gets blocks of its own: a reflink would share the source's,
            // which its first writes must then find room to copy.
            snapcopy::clone_path(&src, &dst, !options.preallocate, Cancel::never())
        };
        let result = mechanism.and_then(|mechanism| {
            // Larger than the source: the image grows now, its filesystem when it is next
            // staged (see `stage`).
            let len = std::fs::metadata(&dst)
                .map_err(|e| BackendError::io("stat", &dst, e))?
                .len();
            let bytes = options.capacity_bytes.max(len);
            if options.preallocate {
                // The copy keeps holes, and the blocks a preallocated source never wrote read
                // as holes too (unwritten extents): allocate every block now, as CreateVolume
                // does (ENOSPC is RESOURCE_EXHAUSTED), or the volume would be thin.
                loopdev::create_image(&dst, bytes, true)?;
            } else if bytes > len {
                loopdev::grow_image(&dst, bytes)?;
            }
            Ok(mechanism)
        });
        match result {
            Ok(mechanism) => Ok((Enforcement::LoopImage, mechanism)),
            Err(e) => {
                let _ = std::fs::remove_file(&dst);
                Err(e)
            }
        }
    }

    /// Makes `image` (sized, and formatted when it holds a filesystem) so that it appears under
    /// its name only once complete: it is made as `<image>.partial` and renamed into place. A
    /// crash leaves at most the partial file, which start-up recovery removes (an image at its
    /// final name that a killed mkfs.xfs had half written would be taken for a made one: blkid
    /// already sees the XFS superblock). An image already at its name was made completely (a
    /// retry): only its size is checked.
    fn make_image(
        &self,
        image: &Path,
        kind: Kind,
        bytes: u64,
        preallocate: bool,
    ) -> Result<(), BackendError> {
        if image.is_file() {
            loopdev::create_image(image, bytes, preallocate)?;
            if let Kind::Filesystem(fs) = kind {
                loopdev::format(image, fs)?;
            }
            return Ok(());
        }
        let partial = PathBuf::from(format!("{}{PARTIAL_SUFFIX}", image.display()));
        remove_if_present(&partial)?;
        let made = (|| {
            loopdev::create_image(&partial, bytes, preallocate)?;
            if let Kind::Filesystem(fs) = kind {
                loopdev::format(&partial, fs)?;
                // mkfs wrote through the page cache: durable before the name says "made".
                std::fs::File::open(&partial)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| BackendError::io("fsync", &partial, e))?;
            }
            // The images directory is fsynced with the commit that records the volume.
            std::fs::rename(&partial, image).map_err(|e| BackendError::io("rename", &partial, e))
        })();
        if made.is_err() {
            // Nothing records it: left behind, it (with `allocation: preallocate`, all of its
            // space) would stay until an operator noticed.
            let _ = std::fs::remove_file(&partial);
        }
        made
    }

    /// Removes the images a crash left half made (see [`LoopBackend::make_image`]).
    fn remove_partial_images(&self) -> Result<(), BackendError> {
        let entries = std::fs::read_dir(&self.images)
            .map_err(|e| BackendError::io("readdir", &self.images, e))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let ours = name
                .to_str()
                .and_then(|n| n.strip_suffix(PARTIAL_SUFFIX))
                .and_then(|n| n.rsplit_once('.'))
                .is_some_and(|(id, ext)| {
                    Kind::from_extension(ext).is_some() && VolumeId::parse(id).is_ok()
                });
            if ours {
                tracing::warn!(path = %entry.path().display(),
                    "removing an image whose creation was interrupted by a crash");
                remove_if_present(&entry.path())?;
            }
        }
        Ok(())
    }

    fn image(&self, id: &VolumeId, kind: Kind) -> PathBuf {
        self.images.join(format!("{id}.{}", kind.extension()))
    }

    /// The image of an existing volume and what it holds.
    fn find(&self, id: &VolumeId) -> Option<(PathBuf, Kind)> {
        [
            Kind::Filesystem(FsType::Ext4),
            Kind::Filesystem(FsType::Xfs),
            Kind::Block,
        ]
        .into_iter()
        .map(|kind| (self.image(id, kind), kind))
        .find(|(path, _)| path.is_file())
    }

    fn existing(&self, id: &VolumeId) -> Result<(PathBuf, Kind), BackendError> {
        self.find(id).ok_or_else(|| {
            BackendError::io(
                "find image",
                &self.images.join(id.as_str()),
                std::io::Error::from(std::io::ErrorKind::NotFound),
            )
        })
    }
}

impl Backend for LoopBackend {
    fn name(&self) -> &'static str {
        "loop"
    }

    fn can_enforce_capacity(&self) -> bool {
        true
    }

    fn minimum_volume_bytes(&self) -> u64 {
        // The smallest filesystem we format (ext4); block volumes could be smaller, but one
        // number serves capacity tracking.
        FsType::Ext4.min_bytes()
    }

    fn default_volume_bytes(&self) -> u64 {
        DEFAULT_BYTES
    }

    fn size_unit(&self) -> u64 {
        // A loop device holds whole 512-byte sectors (it is attached with `--sector-size 512`):
        // an image of another size is cut down to the sector below, so a raw block volume of a
        // `100M` PVC (100,000,000 bytes) would be a device 256 bytes smaller than asked.
        SECTOR_BYTES
    }

    fn smallest_volume_bytes(&self, options: &VolumeOptions) -> u64 {
        if options.block {
            return 0;
        }
        // An unknown filesystem is refused by `create`, naming it.
        FsType::parse(&options.fs_type).map_or(0, FsType::min_bytes)
    }

    fn check_capability(&self, capability: &Capability) -> Result<(), String> {
        if !capability.access_mode.is_single_node() {
            return Err(format!(
                "access mode {} is not supported: loop volumes live on one node",
                capability.access_mode.name()
            ));
        }
        if let AccessType::Mount {
            fs_type,
            mount_flags,
        } = &capability.access_type
        {
            FsType::parse(fs_type)?;
            MountOptions::from_flags(mount_flags, false)?;
        }
        Ok(())
    }

    fn volumes_differ(&self) -> bool {
        true
    }

    fn check_volume_capability(
        &self,
        id: &VolumeId,
        capability: &Capability,
    ) -> Result<(), String> {
        // The image's name says what it holds; an empty fs_type takes whatever filesystem.
        let Some((_, kind)) = self.find(id) else {
            return Ok(());
        };
        match (&capability.access_type, kind) {
            (AccessType::Block, Kind::Filesystem(fs)) => Err(format!(
                "volume {id} holds {fs}; it is not a raw block volume"
            )),
            (AccessType::Mount { .. }, Kind::Block) => Err(format!(
                "volume {id} is a raw block volume; it holds no filesystem"
            )),
            (AccessType::Mount { fs_type, .. }, Kind::Filesystem(fs))
                if !fs_type.is_empty() && fs_type != fs.name() =>
            {
                Err(format!("volume {id} holds {fs}, not {fs_type}"))
            }
            _ => Ok(()),
        }
    }

    fn create(&self, id: &VolumeId, options: &VolumeOptions) -> Result<Enforcement, BackendError> {
        let kind = if options.block {
            Kind::Block
        } else {
            Kind::Filesystem(FsType::parse(&options.fs_type).map_err(BackendError::Unsupported)?)
        };
        if let Some((_, existing)) = self.find(id)
            && existing != kind
        {
            return Err(BackendError::Unsupported(format!(
                "volume {id} already exists as {}",
                existing.extension()
            )));
        }
        let bytes = match options.capacity_bytes {
            0 => DEFAULT_BYTES,
            n => n,
        };
        if let Kind::Filesystem(fs) = kind
            && bytes < fs.min_bytes()
        {
            return Err(BackendError::Unsupported(format!(
                "{fs} volumes must be at least {} bytes",
                fs.min_bytes()
            )));
        }
        self.make_image(&self.image(id, kind), kind, bytes, options.preallocate)?;
        Ok(Enforcement::LoopImage)
    }

    fn expand(&self, id: &VolumeId, capacity_bytes: u64) -> Result<(), BackendError> {
        let (image, _) = self.existing(id)?;
        loopdev::grow_image(&image, capacity_bytes)
    }

    fn node_expansion_required(&self) -> bool {
        true
    }

    fn delete(&self, id: &VolumeId) -> Result<(), BackendError> {
        let Some((image, _)) = self.find(id) else {
            return Ok(());
        };
        loopdev::detach(&image)?;
        match std::fs::remove_file(&image) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(BackendError::io("remove", &image, e)),
        }
    }

    fn exists(&self, id: &VolumeId) -> Result<bool, BackendError> {
        Ok(self.find(id).is_some())
    }

    fn volume_path(&self, id: &VolumeId) -> PathBuf {
        self.find(id)
            .map(|(path, _)| path)
            .unwrap_or_else(|| self.image(id, Kind::Filesystem(FsType::Ext4)))
    }

    fn sync_dirs(&self) -> Vec<PathBuf> {
        vec![self.images.clone()]
    }

    fn capacity(&self) -> Result<FsCapacity, BackendError> {
        FsCapacity::of(&self.images)
    }

    fn usage(&self, id: &VolumeId) -> Result<Usage, BackendError> {
        // Without a mounted filesystem to ask, what the image occupies on disk.
        let (image, _) = self.existing(id)?;
        let meta = std::fs::metadata(&image).map_err(|e| BackendError::io("stat", &image, e))?;
        Ok(Usage {
            used_bytes: meta.blocks() * 512,
            used_inodes: 0,
        })
    }

    fn capacity_at(&self, id: &VolumeId, at: &Path) -> Result<FsCapacity, BackendError> {
        // A filesystem volume's space and inodes are its own filesystem's; the data
        // directory's (which holds the image) say nothing about them.
        match self.existing(id)?.1 {
            Kind::Filesystem(_) => FsCapacity::of(at),
            // A raw block device has bytes (the image's, bounded by the space left to grow
            // into) but no inodes: the data directory's would be reported as the volume's.
            Kind::Block => Ok(FsCapacity {
                total_inodes: 0,
                free_inodes: 0,
                ..self.capacity()?
            }),
        }
    }

    fn usage_at(&self, id: &VolumeId, at: &Path) -> Result<Usage, BackendError> {
        let (_, kind) = self.existing(id)?;
        if kind == Kind::Block {
            return self.usage(id);
        }
        let st = rustix::fs::statvfs(at).map_err(|e| BackendError::io("statvfs", at, e.into()))?;
        Ok(Usage {
            used_bytes: (st.f_blocks - st.f_bfree).saturating_mul(st.f_frsize),
            used_inodes: st.f_files - st.f_ffree,
        })
    }

    fn list(&self) -> Result<Vec<VolumeId>, BackendError> {
        let entries = std::fs::read_dir(&self.images)
            .map_err(|e| BackendError::io("readdir", &self.images, e))?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let parsed = name
                .to_str()
                .and_then(|n| n.rsplit_once('.'))
                .and_then(|(id, ext)| {
                    Kind::from_extension(ext)?;
                    VolumeId::parse(id).ok()
                });
            match parsed {
                Some(id) => out.push(id),
                None => tracing::warn!(
                    path = %entry.path().display(),
                    "unexpected entry in the images directory; leaving it alone"
                ),
            }
        }
        Ok(out)
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
        self.take_snapshot(source, snapshot, false, cancel)
    }

    fn snapshot_is_instant(&self, _source: &VolumeId) -> bool {
        // Images and their snapshots share the data directory's filesystem.
        snapcopy::can_reflink(&self.snapshots)
    }

    fn quiesce(&self, id: &VolumeId) -> Result<Option<freeze::Frozen>, BackendError> {
        let (image, kind) = self.existing(id)?;
        if kind == Kind::Block && loopdev::find_attached(&image)?.is_some() {
            // A flush orders nothing across volumes: writes continue between the members' cuts.
            return Err(BackendError::Unsupported(format!(
                "volume {id} is a raw block volume in use; it cannot be frozen for a volume \
                 group snapshot"
            )));
        }
        self.quiesce_image(&image, kind)
    }

    fn snapshot_quiesced(
        &self,
        source: &VolumeId,
        snapshot: &SnapshotId,
    ) -> Result<Mechanism, BackendError> {
        // Part of a group snapshot, cut before CreateVolumeGroupSnapshot answers.
        self.take_snapshot(source, snapshot, true, Cancel::never())
    }

    fn delete_snapshot(&self, snapshot: &SnapshotId) -> Result<(), BackendError> {
        self.remove_snapshot(snapshot)
    }

    fn snapshot_exists(&self, snapshot: &SnapshotId) -> Result<bool, BackendError> {
        Ok(self.find_snapshot(snapshot).is_some())
    }

    fn list_snapshots(&self) -> Result<Vec<SnapshotId>, BackendError> {
        let entries = std::fs::read_dir(&self.snapshots)
            .map_err(|e| BackendError::io("readdir", &self.snapshots, e))?;
        Ok(entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name();
                let (id, ext) = name.to_str()?.rsplit_once('.')?;
                Kind::from_extension(ext)?;
                SnapshotId::parse(id).ok()
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
        self.remove_partial_images()?;
        let entries = std::fs::read_dir(&self.snapshots)
            .map_err(|e| BackendError::io("readdir", &self.snapshots, e))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let partial_of_ours = name
                .to_str()
                .and_then(|n| n.strip_suffix(PARTIAL_SUFFIX))
                .and_then(|n| n.rsplit_once('.'))
                .and_then(|(id, _)| SnapshotId::parse(id).ok())
                .is_some_and(|id| id.backend() == self.name());
            if partial_of_ours {
                tracing::warn!(path = %entry.path().display(),
                    "removing a snapshot copy interrupted by a crash");
                std::fs::remove_file(entry.path())
                    .map_err(|e| BackendError::io("remove", &entry.path(), e))?;
            }
        }
        // A crash between freeze and thaw leaves the volume's filesystem frozen.
        for id in self.list()? {
            let Some((image, Kind::Filesystem(_))) = self.find(&id) else {
                continue;
            };
            if let Some(device) = loopdev::find_attached(&image)?
                && let Err(e) = freeze::thaw_after_crash(&device)
            {
                tracing::error!(volume_id = %id, error = %e, "could not thaw a volume's filesystem");
            }
        }
        Ok(())
    }

    fn stages_mounts(&self) -> bool {
        true
    }

    fn stage(
        &self,
        id: &VolumeId,
        access: &AccessType,
        staging: &ConfinedPath,
        mounter: &dyn Mounter,
    ) -> Result<(), BackendError> {
        let (image, kind) = self.existing(id)?;
        match (kind, access) {
            (Kind::Block, AccessType::Mount { .. }) => {
                return Err(BackendError::Unsupported(format!(
                    "volume {id} is a raw block volume and cannot be mounted as a filesystem"
                )));
            }
            (Kind::Filesystem(_), AccessType::Block) => {
                return Err(BackendError::Unsupported(format!(
                    "volume {id} holds a filesystem and cannot be used as a raw block device"
                )));
            }
            _ => {}
        }
        // The volume's own filesystem: the flags that belong to a whole filesystem (sync,
        // dirsync) are set on its mount here, since the publications' bind mounts cannot.
        let options = match access {
            AccessType::Mount { mount_flags, .. } => MountOptions::from_flags(mount_flags, false)
                .map_err(BackendError::Unsupported)?
                .filesystem_wide(),
            AccessType::Block => MountOptions::default(),
        };
        // A preallocated image's device refuses discards (see `loopdev::refuse_discards`).
        let device = loopdev::attach(&image)?;
        if let Kind::Filesystem(fs) = kind {
            let mounted = mounter.inspect(staging)?.is_some_and(|s| s.is_mount_point);
            if !mounted {
                if let Err(e) = mounter.mount_device(&device, fs.name(), staging, &options) {
                    // Nothing uses the device now: do not leave it attached (it would keep the
                    // image, and the data filesystem holding it, busy).
                    if let Err(d) = loopdev::detach(&image) {
                        tracing::warn!(volume_id = %id, error = %d,
                            "could not detach the loop device after a failed mount");
                    }
                    return Err(e.into());
                }
                // A volume restored or cloned into a larger size has a larger image than its
                // filesystem: grow the filesystem to the device (a no-op otherwise). A failure
                // leaves a usable, smaller filesystem, so it is reported, not fatal.
                if let Err(e) = loopdev::grow_filesystem(&device, &staging.absolute(), fs) {
                    tracing::warn!(volume_id = %id, error = %e,
                        "could not grow the filesystem to its device at staging");
                }
            }
            // The mount now holds the device: let the kernel free it when the filesystem is
            // unmounted, whoever unmounts it. (Block volumes keep an explicit attachment: a pod
            // opening and closing the device must not detach it.)
            if !loopdev::is_autoclear(&device)
                && let Err(e) = loopdev::mark_autoclear(&device)
            {
                tracing::warn!(volume_id = %id, device = %device.display(), error = %e,
                    "could not set autoclear; NodeUnstageVolume will detach the device");
            }
        }
        Ok(())
    }

    fn unstage(
        &self,
        id: &VolumeId,
        staging: &ConfinedPath,
        mounter: &dyn Mounter,
    ) -> Result<(), BackendError> {
        // Unmounting a staged filesystem detaches its device (autoclear) before `detach` can
        // see it: note it first, so a device left refusing discards is still retired.
        let image = self.find(id).map(|(image, _)| image);
        let device = image
            .as_ref()
            .and_then(|image| loopdev::find_attached(image).ok().flatten());
        if mounter.inspect(staging)?.is_some_and(|s| s.is_mount_point) {
            mounter.unmount(staging)?;
        }
        if let Some(image) = &image {
            loopdev::detach(image)?;
        }
        if let Some(device) = device {
            loopdev::retire_if_discards_refused(&device);
        }
        Ok(())
    }

    fn shows_staged(
        &self,
        id: &VolumeId,
        _staging: &ConfinedPath,
        state: &PathState,
    ) -> Result<bool, BackendError> {
        // A staged filesystem volume is its loop device's filesystem mounted at the staging
        // path; block volumes mount nothing there.
        let Some((image, Kind::Filesystem(_))) = self.find(id) else {
            return Ok(false);
        };
        let Some(device) = loopdev::find_attached(&image)? else {
            return Ok(false);
        };
        let meta = std::fs::metadata(&device).map_err(|e| BackendError::io("stat", &device, e))?;
        Ok(meta.rdev() == state.dev)
    }

    fn prepare_publish(&self, id: &VolumeId, readonly: bool) -> Result<(), BackendError> {
        let (image, kind) = self.existing(id)?;
        if readonly && kind == Kind::Block {
            // Writes through a read-only bind of a writable device node still reach the
            // device; a read-only publication gets a read-only device of its own, attached
            // only while the volume is staged (its writable device is the proof of that).
            if loopdev::find_attached(&image)?.is_none() {
                return Err(BackendError::Unsupported(format!(
                    "volume {id} is not staged: no loop device is attached to it"
                )));
            }
            loopdev::attach_read_only(&image)?;
        }
        Ok(())
    }

    fn publish_source(
        &self,
        id: &VolumeId,
        staging: Option<&ConfinedPath>,
        readonly: bool,
    ) -> Result<PublishSource, BackendError> {
        let (image, kind) = self.existing(id)?;
        match kind {
            Kind::Filesystem(_) => {
                let staging = staging.ok_or_else(|| {
                    BackendError::Unsupported(format!("volume {id} is not staged"))
                })?;
                Ok(PublishSource::Directory(staging.absolute()))
            }
            Kind::Block => {
                let device = if readonly {
                    loopdev::find_attached_read_only(&image)?
                } else {
                    loopdev::find_attached(&image)?
                };
                device.map(PublishSource::Device).ok_or_else(|| {
                    BackendError::Unsupported(format!(
                        "volume {id} is not staged: no {}loop device is attached to it",
                        if readonly { "read-only " } else { "" }
                    ))
                })
            }
        }
    }

    fn node_expand(
        &self,
        id: &VolumeId,
        staging: Option<&ConfinedPath>,
    ) -> Result<Option<u64>, BackendError> {
        let (image, kind) = self.existing(id)?;
        let Some(device) = loopdev::find_attached(&image)? else {
            // Not attached here: the next stage sees the grown image (and the filesystem is
            // grown then by the CO's next NodeExpandVolume).
            return Ok(None);
        };
        loopdev::refresh_capacity(&device)?;
        if let Some(read_only) = loopdev::find_attached_read_only(&image)? {
            loopdev::refresh_capacity(&read_only)?;
        }
        if let (Kind::Filesystem(fs), Some(staging)) = (kind, staging) {
            loopdev::grow_filesystem(&device, &staging.absolute(), fs)?;
        }
        Ok(Some(loopdev::device_size(&device)?))
    }
}

/// Removes a file; absent is success.
fn remove_if_present(path: &Path) -> Result<(), BackendError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(BackendError::io("remove", path, e)),
    }
}
