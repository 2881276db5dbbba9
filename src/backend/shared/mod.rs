//! The `shared` backend: each volume is a subdirectory of an existing shared filesystem (an
//! NFS export, CephFS, CIFS, or any filesystem the node can mount, down to a local directory),
//! usable from every node at once (ReadWriteMany).
//!
//! Nothing about a shared volume depends on one node's state, so the controller can restart
//! anywhere, on an empty state directory, and still delete what it created:
//!
//! - The volume ID carries the share (see [`spec`]).
//! - The share carries the rest: `<share>/.k8scsi/volumes/<volume-id>` is a marker (JSON,
//!   written atomically: temporary file, fsync, rename, fsync of the directory) naming the
//!   volume's directory and what DeleteVolume does with it. A directory is only ever removed
//!   or archived through its marker, and a marker is only written for a directory this backend
//!   created and that does not contain, or sit inside, another volume's directory, so no
//!   template can make one volume's deletion reach another's data.
//!
//! The controller mounts a share only while it works on it ([`mounts::ShareMounts`]). On a node,
//! NodeStageVolume mounts the share privately, bind-mounts the volume's directory (resolved
//! beneath the share root without following symlinks) at the staging path and drops the private
//! mount; NodePublishVolume bind-mounts the staging path into pods. Capacity is recorded, never
//! enforced.

pub mod mounts;
pub mod snapshots;
pub mod spec;
pub mod tree;

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::{AtFlags, Mode, OFlags};

use super::Cancel;
use super::{
    Backend, BackendError, ContentSource, Enforcement, FsCapacity, Mechanism, PublishSource,
    StoredSnapshot, Usage, VolumeOptions,
};
use crate::engine::ids::{SnapshotId, VolumeId};
use crate::engine::types::{AccessMode, AccessType, Capability};
use crate::mount::{ConfinedPath, MountOptions, Mounter, PathState};
use mounts::ShareMounts;
use spec::{OnDelete, ShareRef};

/// Our metadata directory at the root of every share.
const META_DIR: &str = ".k8scsi";
/// Inside it, one marker per volume.
const MARKERS: &str = "volumes";
/// Prefix of a marker being written.
const TMP_PREFIX: &str = ".tmp-";

/// What the share records about one volume.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Marker {
    /// The volume ID (must equal the marker's file name).
    pub id: String,
    /// The CSI volume name.
    pub name: String,
    /// The volume's directory below the share root, one entry per component.
    pub dir: Vec<String>,
    /// What DeleteVolume does with the directory.
    pub on_delete: OnDelete,
    /// Requested capacity (recorded, not enforced).
    pub capacity_bytes: u64,
    /// Creation time, seconds since the epoch.
    pub created_unix: u64,
}

/// Shared-filesystem volumes.
#[derive(Debug, Clone)]
pub struct SharedBackend {
    mounts: Arc<ShareMounts>,
    work: PathBuf,
}

fn share_of(id: &VolumeId) -> Result<ShareRef, BackendError> {
    id.as_str()
        .strip_prefix("shared-")
        .ok_or_else(|| BackendError::Unsupported(format!("{id} is not a shared volume")))
        .and_then(|tail| {
            spec::parse_id_tail(tail)
                .map_err(|e| BackendError::Unsupported(format!("volume ID {id}: {e}")))
        })
}

fn invalid(e: spec::SpecError) -> BackendError {
    BackendError::Unsupported(e.0)
}

fn io_at<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> BackendError + 'a {
    move |e| BackendError::io(op, path, e)
}

fn is_not_found(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound
}

/// The mount flags of a mount capability (none for block).
fn flags_of(access: &AccessType) -> &[String] {
    match access {
        AccessType::Mount { mount_flags, .. } => mount_flags,
        AccessType::Block => &[],
    }
}

impl SharedBackend {
    /// Private share mounts go under `<data_dir>/shares`; `program` mounts them, within
    /// `timeout` (as do unmounts).
    pub fn new(
        data_dir: &Path,
        timeout: Duration,
        program: &str,
    ) -> Result<SharedBackend, BackendError> {
        let work = data_dir.join("shares");
        Ok(SharedBackend {
            mounts: Arc::new(ShareMounts::new(&work, timeout, program)?),
            work,
        })
    }

    /// The share mounts (for diagnostics and tests).
    pub fn mounts(&self) -> &Arc<ShareMounts> {
        &self.mounts
    }

    /// Opens the root of a mounted share.
    fn open_root(path: &Path) -> Result<OwnedFd, BackendError> {
        rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| BackendError::io("open share", path, e.into()))
    }

    /// Opens `.k8scsi/volumes` at the share root, creating it only when `create` (CreateVolume
    /// is the only caller that may write to a share named by a request); `None` when absent.
    fn marker_dir(
        root: BorrowedFd<'_>,
        at: &Path,
        create: bool,
    ) -> Result<Option<OwnedFd>, BackendError> {
        let components = [META_DIR.to_string(), MARKERS.to_string()];
        if create {
            let (fd, _) = tree::make_dirs(root, &components, 0o700)
                .map_err(io_at("create marker directory", at))?;
            return Ok(Some(fd));
        }
        match tree::open_dir(root, &components) {
            Ok(fd) => Ok(Some(fd)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(BackendError::io("open marker directory", at, e)),
        }
    }

    /// Reads the marker of `id`, `None` if there is none. A marker that does not describe `id`
    /// or names an invalid directory is an error: we never act on it.
    fn read_marker(
        markers: BorrowedFd<'_>,
        id: &VolumeId,
        at: &Path,
    ) -> Result<Option<Marker>, BackendError> {
        let file = match rustix::fs::openat(
            markers,
            id.as_str(),
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(f) => f,
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(e) => return Err(BackendError::io("open marker", at, e.into())),
        };
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(file), &mut text)
            .map_err(io_at("read marker", at))?;
        let marker: Marker = serde_json::from_str(&text).map_err(|e| {
            BackendError::Unsupported(format!(
                "marker of volume {id} on the share is corrupt: {e}"
            ))
        })?;
        if marker.id != id.as_str() {
            return Err(BackendError::Unsupported(format!(
                "marker {id} on the share describes volume {:?}; leaving it alone",
                marker.id
            )));
        }
        spec::check_components(&marker.dir).map_err(invalid)?;
        Ok(Some(marker))
    }

    /// Every valid marker on the share (for collision checks).
    fn all_markers(markers: BorrowedFd<'_>, at: &Path) -> Result<Vec<Marker>, BackendError> {
        let mut out = Vec::new();
        for name in tree::names(markers).map_err(io_at("list markers", at))? {
            if name.starts_with(TMP_PREFIX) {
                Self::remove_stale_tmp(markers, &name);
                continue;
            }
            let Ok(id) = VolumeId::parse(&name) else {
                continue;
            };
            match Self::read_marker(markers, &id, at) {
                Ok(Some(m)) => out.push(m),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(marker = name, error = %e, "ignoring an unreadable marker")
                }
            }
        }
        Ok(out)
    }

    /// Removes a temporary marker left by a process that died while writing it (older than
    /// ten minutes, so never one being written now).
    fn remove_stale_tmp(markers: BorrowedFd<'_>, name: &str) {
        let stale = rustix::fs::statat(markers, name, AtFlags::SYMLINK_NOFOLLOW).is_ok_and(|st| {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or_default();
            now - st.st_mtime > 600
        });
        if stale && rustix::fs::unlinkat(markers, name, AtFlags::empty()).is_ok() {
            tracing::info!(marker = name, "removed a stale temporary marker");
        }
    }

    /// Writes a marker atomically: temporary file, fsync, rename over, fsync the directory.
    fn write_marker(
        markers: BorrowedFd<'_>,
        marker: &Marker,
        at: &Path,
    ) -> Result<(), BackendError> {
        let json = serde_json::to_vec_pretty(marker).expect("markers serialize");
        Self::write_atomically(markers, &marker.id, &json, at)
    }

    /// Replaces the file `name` in `dir` with `contents` so that a reader (or a crash) sees
    /// the old file or the new one, never a part: temporary file, fsync, rename, fsync `dir`.
    fn write_atomically(
        dir: BorrowedFd<'_>,
        name: &str,
        contents: &[u8],
        at: &Path,
    ) -> Result<(), BackendError> {
        let tmp = format!("{TMP_PREFIX}{name}");
        let _ = rustix::fs::unlinkat(dir, tmp.as_str(), AtFlags::empty());
        let fd = rustix::fs::openat(
            dir,
            tmp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| BackendError::io("create marker", at, e.into()))?;
        let mut file = std::fs::File::from(fd);
        file.write_all(contents)
            .map_err(io_at("write marker", at))?;
        file.sync_all().map_err(io_at("fsync marker", at))?;
        drop(file);
        rustix::fs::renameat(dir, tmp.as_str(), dir, name)
            .map_err(|e| BackendError::io("rename marker", at, e.into()))?;
        rustix::fs::fsync(dir).map_err(|e| BackendError::io("fsync", at, e.into()))?;
        Ok(())
    }

    fn remove_marker(
        markers: BorrowedFd<'_>,
        id: &VolumeId,
        at: &Path,
    ) -> Result<(), BackendError> {
        let _ = rustix::fs::unlinkat(
            markers,
            format!("{TMP_PREFIX}{id}").as_str(),
            AtFlags::empty(),
        );
        match rustix::fs::unlinkat(markers, id.as_str(), AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(BackendError::io("remove marker", at, e.into())),
        }
        rustix::fs::fsync(markers).map_err(|e| BackendError::io("fsync", at, e.into()))?;
        Ok(())
    }

    /// Runs `work` with the share of `id` mounted and its root and marker directory open;
    /// returns `absent` without calling it when the share has no marker directory.
    fn with_share<T>(
        &self,
        id: &VolumeId,
        absent: T,
        work: impl FnOnce(BorrowedFd<'_>, BorrowedFd<'_>, &Path) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        let share = share_of(id)?;
        self.with_share_ref(&share, false, |root, markers, at| match markers {
            Some(markers) => work(root, markers, at),
            None => Ok(absent),
        })
    }

    fn with_share_ref<T>(
        &self,
        share: &ShareRef,
        create: bool,
        work: impl FnOnce(BorrowedFd<'_>, Option<BorrowedFd<'_>>, &Path) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        let guard = self.mounts.acquire(share)?;
        let root = Self::open_root(guard.path())?;
        let markers = Self::marker_dir(root.as_fd(), guard.path(), create)?;
        let result = work(
            root.as_fd(),
            markers.as_ref().map(|m| m.as_fd()),
            guard.path(),
        );
        drop((markers, root));
        drop(guard);
        result
    }

    /// The marker of an existing volume and its directory, open.
    fn open_volume(
        root: BorrowedFd<'_>,
        markers: BorrowedFd<'_>,
        id: &VolumeId,
        at: &Path,
    ) -> Result<Option<(Marker, Option<OwnedFd>)>, BackendError> {
        let Some(marker) = Self::read_marker(markers, id, at)? else {
            return Ok(None);
        };
        let dir = match tree::open_dir(root, &marker.dir) {
            Ok(fd) => Some(fd),
            Err(e) if is_not_found(&e) => None,
            Err(e) => {
                return Err(BackendError::io(
                    "open volume directory",
                    &at.join(marker.dir.join("/")),
                    e,
                ));
            }
        };
        Ok(Some((marker, dir)))
    }

    /// Copies the contents of volume `from` into volume `to` (both existing, on the same
    /// share), by reflink where the share supports it. For clones and snapshots.
    pub fn copy_volume(
        &self,
        from: &VolumeId,
        to: &VolumeId,
    ) -> Result<tree::CopyStats, BackendError> {
        let (a, b) = (share_of(from)?, share_of(to)?);
        if a != b {
            return Err(BackendError::Unsupported(format!(
                "volumes {from} and {to} are on different shares; copies stay within one share"
            )));
        }
        self.with_share_ref(&a, false, |root, markers, at| {
            let missing = |id: &VolumeId| {
                BackendError::io(
                    "open volume",
                    &at.join(id.as_str()),
                    std::io::Error::from(std::io::ErrorKind::NotFound),
                )
            };
            let markers = markers.ok_or_else(|| missing(from))?;
            let (_, src) =
                Self::open_volume(root, markers, from, at)?.ok_or_else(|| missing(from))?;
            let (_, dst) = Self::open_volume(root, markers, to, at)?.ok_or_else(|| missing(to))?;
            let (src, dst) = (
                src.ok_or_else(|| missing(from))?,
                dst.ok_or_else(|| missing(to))?,
            );
            tree::copy_tree(src.as_fd(), dst.as_fd()).map_err(io_at("copy volume", at))
        })
    }

    /// The marker (and directory mode) a new volume gets from its options.
    fn new_marker(
        id: &VolumeId,
        options: &VolumeOptions,
    ) -> Result<(Marker, Option<u32>), BackendError> {
        let params = &options.parameters;
        let dir = spec::render_subdir(
            params.get(spec::SUB_DIR).map(String::as_str),
            &options.metadata,
            &options.name,
        )
        .map_err(invalid)?;
        let on_delete =
            OnDelete::parse(params.get(spec::ON_DELETE).map(String::as_str)).map_err(invalid)?;
        let permissions =
            spec::parse_permissions(params.get(spec::MOUNT_PERMISSIONS).map(String::as_str))
                .map_err(invalid)?;
        let marker = Marker {
            id: id.to_string(),
            name: options.name.clone(),
            dir,
            on_delete,
            capacity_bytes: options.capacity_bytes,
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default(),
        };
        Ok((marker, permissions))
    }

    /// The share of a volume, as shown in its volume context.
    pub fn describe(id: &VolumeId) -> Option<String> {
        share_of(id).ok().map(|s| s.display())
    }

    fn create_on_share(
        root: BorrowedFd<'_>,
        markers: BorrowedFd<'_>,
        at: &Path,
        wanted: Marker,
        permissions: Option<u32>,
    ) -> Result<(), BackendError> {
        let id =
            VolumeId::parse(&wanted.id).map_err(|e| BackendError::Unsupported(e.to_string()))?;
        if let Some(existing) = Self::read_marker(markers, &id, at)? {
            if existing.dir != wanted.dir {
                return Err(BackendError::Conflict(format!(
                    "volume {id} already exists on the share in directory {:?}",
                    existing.dir.join("/")
                )));
            }
            // A retry (or a controller on a fresh state directory): adopt our own directory,
            // recreating it if an interrupted delete removed it.
            tree::make_dirs(root, &existing.dir, permissions.unwrap_or(0o755))
                .map_err(io_at("create volume directory", at))?;
            return Ok(());
        }
        let inside = |outer: &[String], inner: &[String]| inner.starts_with(outer);
        for other in Self::all_markers(markers, at)? {
            if inside(&other.dir, &wanted.dir) || inside(&wanted.dir, &other.dir) {
                return Err(BackendError::Conflict(format!(
                    "directory {:?} for volume {:?} overlaps directory {:?} of volume {}; \
                     each volume needs its own directory (check the subDir template)",
                    wanted.dir.join("/"),
                    wanted.name,
                    other.dir.join("/"),
                    other.id
                )));
            }
        }
        match tree::open_dir(root, &wanted.dir) {
            Ok(_) => {
                return Err(BackendError::Conflict(format!(
                    "directory {:?} already exists on the share and belongs to no volume of \
                     ours; refusing to adopt data we did not create",
                    wanted.dir.join("/")
                )));
            }
            Err(e) if is_not_found(&e) => {}
            Err(e) => {
                return Err(BackendError::io(
                    "check volume directory",
                    &at.join(wanted.dir.join("/")),
                    e,
                ));
            }
        }
        // Marker first: a crash after it leaves a directory (or nothing) that a retry adopts
        // and a delete removes; never a directory nobody claims.
        Self::write_marker(markers, &wanted, at)?;
        let (dir, _) = tree::make_dirs(root, &wanted.dir, permissions.unwrap_or(0o755))
            .map_err(io_at("create volume directory", at))?;
        if let Some(mode) = permissions {
            // Explicitly, so the umask does not narrow it.
            rustix::fs::fchmod(&dir, Mode::from_raw_mode(mode))
                .map_err(|e| BackendError::io("chmod", at, e.into()))?;
        }
        rustix::fs::fsync(&dir).map_err(|e| BackendError::io("fsync", at, e.into()))?;
        Ok(())
    }

    /// Removes volume `id` from its share as its marker says (`unrecorded`: as `delete`
    /// whatever the marker says, see [`Backend::discard`]).
    fn delete_on_share(
        root: BorrowedFd<'_>,
        markers: BorrowedFd<'_>,
        at: &Path,
        id: &VolumeId,
        unrecorded: bool,
    ) -> Result<(), BackendError> {
        let Some(marker) = Self::read_marker(markers, id, at)? else {
            return Ok(());
        };
        let (parent_components, leaf) = marker.dir.split_at(marker.dir.len() - 1);
        let leaf = &leaf[0];
        let shown = at.join(marker.dir.join("/"));
        let on_delete = if unrecorded {
            OnDelete::Delete
        } else {
            marker.on_delete
        };
        match tree::open_dir(root, parent_components) {
            Ok(parent) => match on_delete {
                OnDelete::Delete => {
                    tree::remove_tree(parent.as_fd(), leaf).map_err(io_at("remove", &shown))?;
                }
                OnDelete::Retain => {
                    tracing::info!(volume_id = %id, dir = %shown.display(), "onDelete=retain: leaving the directory");
                }
                OnDelete::Archive => {
                    let archived = Self::archive_name(parent.as_fd(), leaf, &shown)?;
                    match rustix::fs::renameat(
                        parent.as_fd(),
                        leaf.as_str(),
                        parent.as_fd(),
                        archived.as_str(),
                    ) {
                        Ok(()) => {
                            tracing::info!(volume_id = %id, dir = %shown.display(), archived, "onDelete=archive: renamed");
                            rustix::fs::fsync(&parent)
                                .map_err(|e| BackendError::io("fsync", &shown, e.into()))?;
                        }
                        Err(rustix::io::Errno::NOENT) => {}
                        Err(e) => return Err(BackendError::io("archive", &shown, e.into())),
                    }
                }
            },
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(BackendError::io("open parent", &shown, e)),
        }
        Self::remove_marker(markers, id, at)
    }

    /// A name for archiving the directory `leaf` in `parent` that nothing there has yet:
    /// `archived-<leaf>-<unix seconds>`, with `.1`, `.2`, ... appended when a directory of the
    /// same name was archived within the same second (a re-created volume deleted again), which
    /// a plain rename would fail on (`ENOTEMPTY`) or, for an empty directory, silently replace.
    /// Checked with a lookup rather than `RENAME_NOREPLACE`, which NFS does not support; only
    /// the caller, holding the volume's key, archives this volume's directories. A leaf too
    /// long for that to fit in a file name (see [`archive_leaf`]) is shortened.
    fn archive_name(
        parent: BorrowedFd<'_>,
        leaf: &str,
        shown: &Path,
    ) -> Result<String, BackendError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default()
            .to_string();
        let base = format!("archived-{}-{now}", archive_leaf(leaf, &now));
        for n in 0..ARCHIVE_COPIES {
            let candidate = if n == 0 {
                base.clone()
            } else {
                format!("{base}.{n}")
            };
            match rustix::fs::statat(parent, candidate.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
                Err(rustix::io::Errno::NOENT) => return Ok(candidate),
                Ok(_) => continue,
                Err(e) => return Err(BackendError::io("archive", shown, e.into())),
            }
        }
        Err(BackendError::Conflict(format!(
            "too many archived copies of {} in one second",
            shown.display()
        )))
    }
}

/// How many copies [`SharedBackend::archive_name`] numbers within one second (`.1` to `.9999`).
const ARCHIVE_COPIES: u32 = 10_000;

/// `leaf` as it appears in `archived-<leaf>-<now>[.<n>]`: unchanged when that name fits in
/// `NAME_MAX` (255 bytes) whatever the copy number, which is every leaf of up to 230 bytes;
/// otherwise its first bytes (at a character boundary), `~` and the first 8 hex digits of its
/// SHA-256, so that the name fits and two long leaves with the same beginning do not share
/// archive names. A volume's leaf may be 255 bytes (`subDir: ${pvc.metadata.name}` with a PVC
/// name of up to 253), and the rename to a longer name failed with `ENAMETOOLONG` on every retry
/// of DeleteVolume. `~` cannot occur in a leaf, so a shortened name is never one of a whole leaf.
fn archive_leaf<'a>(leaf: &'a str, now: &str) -> std::borrow::Cow<'a, str> {
    use sha2::{Digest, Sha256};
    const NAME_MAX: usize = 255;
    let suffix = (ARCHIVE_COPIES - 1).to_string().len() + 1; // ".9999"
    let fixed = "archived-".len() + 1 + now.len() + suffix;
    if fixed + leaf.len() <= NAME_MAX {
        return std::borrow::Cow::Borrowed(leaf);
    }
    let hash: String = Sha256::digest(leaf.as_bytes())[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut keep = NAME_MAX.saturating_sub(fixed + 1 + hash.len());
    while !leaf.is_char_boundary(keep) {
        keep -= 1;
    }
    std::borrow::Cow::Owned(format!("{}~{hash}", &leaf[..keep]))
}

impl Backend for SharedBackend {
    fn name(&self) -> &'static str {
        spec::BACKEND
    }

    fn can_enforce_capacity(&self) -> bool {
        false
    }

    fn node_local(&self) -> bool {
        false
    }

    fn enumerable(&self) -> bool {
        false
    }

    fn check_capability(&self, capability: &Capability) -> Result<(), String> {
        if capability.access_mode == AccessMode::MultiNodeSingleWriter {
            return Err(
                "access mode MULTI_NODE_SINGLE_WRITER is not supported: a single writer across \
                 nodes cannot be enforced on a shared filesystem"
                    .into(),
            );
        }
        match &capability.access_type {
            AccessType::Block => {
                Err("shared volumes are filesystems; block access is not supported".into())
            }
            AccessType::Mount { mount_flags, .. } => spec::check_options(mount_flags)
                .map(|_| ())
                .map_err(|e| e.0),
        }
    }

    fn volume_id(
        &self,
        name: &str,
        parameters: &BTreeMap<String, String>,
        mount_flags: &[String],
    ) -> Result<VolumeId, BackendError> {
        let share = ShareRef::from_parameters(parameters, mount_flags).map_err(invalid)?;
        let raw = spec::volume_id(name, &share).map_err(invalid)?;
        VolumeId::parse(&raw).map_err(|e| BackendError::Unsupported(e.to_string()))
    }

    fn create(&self, id: &VolumeId, options: &VolumeOptions) -> Result<Enforcement, BackendError> {
        let (marker, permissions) = Self::new_marker(id, options)?;
        let share = share_of(id)?;
        self.with_share_ref(&share, true, |root, markers, at| {
            let markers = markers.expect("created on demand");
            Self::create_on_share(root, markers, at, marker, permissions)
        })?;
        Ok(Enforcement::None)
    }

    fn expand(&self, id: &VolumeId, capacity_bytes: u64) -> Result<(), BackendError> {
        // Capacity of shared volumes is recorded only. The marker keeps it too, so a snapshot
        // cut later records the grown size even for a controller without the store.
        self.with_share(id, (), |_, markers, at| {
            if let Some(mut marker) = Self::read_marker(markers, id, at)?
                && marker.capacity_bytes < capacity_bytes
            {
                marker.capacity_bytes = capacity_bytes;
                Self::write_marker(markers, &marker, at)?;
            }
            Ok(())
        })
    }

    fn delete(&self, id: &VolumeId) -> Result<(), BackendError> {
        self.with_share(id, (), |root, markers, at| {
            Self::delete_on_share(root, markers, at, id, false)
        })
    }

    fn discard(&self, id: &VolumeId) -> Result<(), BackendError> {
        // Never acknowledged, so never used: `retain` would leave a directory that blocks the
        // retry (it belongs to no marker any more), `archive` an archived copy nobody asked for.
        self.with_share(id, (), |root, markers, at| {
            Self::delete_on_share(root, markers, at, id, true)
        })
    }

    fn exists(&self, id: &VolumeId) -> Result<bool, BackendError> {
        self.with_share(id, false, |root, markers, at| {
            Ok(Self::open_volume(root, markers, id, at)?.is_some_and(|(_, dir)| dir.is_some()))
        })
    }

    fn volume_path(&self, id: &VolumeId) -> PathBuf {
        // For messages only: where this process mounts the share while it works on it.
        match share_of(id) {
            Ok(share) => self.work.join(share.key()),
            Err(_) => self.work.clone(),
        }
    }

    fn sync_dirs(&self) -> Vec<PathBuf> {
        // Markers and directories on the share are fsynced when written.
        vec![]
    }

    fn capacity(&self) -> Result<FsCapacity, BackendError> {
        // Readiness only: the local directory where shares are mounted must be usable. The
        // space of a share is [`Backend::capacity_for`].
        FsCapacity::of(&self.work)
    }

    fn capacity_for(
        &self,
        parameters: &BTreeMap<String, String>,
        mount_flags: &[String],
    ) -> Result<FsCapacity, BackendError> {
        let share = ShareRef::from_parameters(parameters, mount_flags).map_err(invalid)?;
        let guard = self.mounts.acquire(&share)?;
        FsCapacity::of(guard.path())
    }

    fn capacity_of(&self, id: &VolumeId) -> Result<FsCapacity, BackendError> {
        let guard = self.mounts.acquire(&share_of(id)?)?;
        FsCapacity::of(guard.path())
    }

    fn usage(&self, id: &VolumeId) -> Result<Usage, BackendError> {
        let measured = self.with_share(id, None, |root, markers, at| {
            match Self::open_volume(root, markers, id, at)? {
                Some((_, Some(dir))) => tree::usage(dir.as_fd())
                    .map(Some)
                    .map_err(io_at("measure", at)),
                _ => Ok(None),
            }
        })?;
        measured.ok_or_else(|| {
            BackendError::io(
                "measure",
                &self.volume_path(id),
                std::io::Error::from(std::io::ErrorKind::NotFound),
            )
        })
    }

    fn capacity_at(&self, _id: &VolumeId, at: &Path) -> Result<FsCapacity, BackendError> {
        // The share's space and inodes (the volume is a directory on it), not those of the
        // local directory where shares are mounted.
        FsCapacity::of(at)
    }

    fn usage_at(&self, _id: &VolumeId, at: &Path) -> Result<Usage, BackendError> {
        let dir = rustix::fs::open(
            at,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| BackendError::io("open", at, e.into()))?;
        tree::usage(dir.as_fd()).map_err(io_at("measure", at))
    }

    fn list(&self) -> Result<Vec<VolumeId>, BackendError> {
        // Shares are named by volume IDs only; there is no list of them to walk.
        Ok(vec![])
    }

    fn stages_mounts(&self) -> bool {
        true
    }

    fn publish_options(&self, flags: &[String], readonly: bool) -> Result<MountOptions, String> {
        // The flags are the share's mount options (applied when staging); the bind into the
        // pod only decides read-only, and never allows setuid files or devices.
        spec::check_options(flags).map_err(|e| e.0)?;
        let ro = readonly || flags.iter().any(|f| f.split(',').any(|p| p.trim() == "ro"));
        Ok(MountOptions {
            readonly: ro,
            nosuid: true,
            nodev: true,
            ..Default::default()
        })
    }

    fn stage(
        &self,
        id: &VolumeId,
        access: &AccessType,
        staging: &ConfinedPath,
        mounter: &dyn Mounter,
    ) -> Result<(), BackendError> {
        let mut share = share_of(id)?;
        // The node's own mount options (PV mountOptions) win over what the ID recorded for
        // the controller; they were validated by check_capability.
        let node_flags = spec::check_options(flags_of(access)).map_err(invalid)?;
        if !node_flags.is_empty() {
            share.options = node_flags;
        }
        if mounter.inspect(staging)?.is_some_and(|s| s.is_mount_point) {
            return Ok(());
        }
        self.with_share_ref(&share, false, |root, markers, at| {
            let found = match markers {
                Some(markers) => Self::open_volume(root, markers, id, at)?,
                None => None,
            };
            let Some((marker, dir)) = found else {
                return Err(BackendError::Unsupported(format!(
                    "volume {id} has no marker on its share; it does not exist (anymore)"
                )));
            };
            let Some(dir) = dir else {
                return Err(BackendError::Unsupported(format!(
                    "the directory {:?} of volume {id} is missing on the share",
                    marker.dir.join("/")
                )));
            };
            // Bind exactly the directory we resolved, through its descriptor.
            let source = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
            let options = MountOptions {
                nosuid: true,
                nodev: true,
                readonly: share.options.iter().any(|o| o == "ro"),
                ..Default::default()
            };
            mounter.bind(&source, staging, &options)?;
            Ok(())
        })
    }

    fn unstage(
        &self,
        _id: &VolumeId,
        staging: &ConfinedPath,
        mounter: &dyn Mounter,
    ) -> Result<(), BackendError> {
        match mounter.inspect(staging) {
            Ok(Some(state)) if state.is_mount_point => {}
            Ok(_) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        // A dead server can make umount(2) hang: give it the timeout, then detach lazily.
        let outcome =
            mounts::unmount_with_timeout(&staging.absolute(), self.mounts.timeout(), false)?;
        if outcome == mounts::Unmounted::Lazily {
            tracing::warn!(path = %staging, "staging mount of a shared volume was detached lazily");
        }
        Ok(())
    }

    fn shows_staged(
        &self,
        id: &VolumeId,
        staging: &ConfinedPath,
        state: &PathState,
    ) -> Result<bool, BackendError> {
        // The staged mount is a bind of the volume's directory on the share: the same inode, on
        // a filesystem of the same type, as the directory its marker names. Not the same
        // device number: a FUSE share, or NFS with `nosharecache` or other options than the
        // node's, is a new superblock (a new device) each time it is mounted.
        let share = share_of(id)?;
        let io = |path: &Path, e: rustix::io::Errno| {
            BackendError::io(
                "stat",
                path,
                std::io::Error::from_raw_os_error(e.raw_os_error()),
            )
        };
        let staged_type = rustix::fs::statfs(staging.absolute())
            .map_err(|e| io(&staging.absolute(), e))?
            .f_type;
        self.with_share_ref(&share, false, |root, markers, at| {
            let Some(markers) = markers else {
                return Ok(false);
            };
            let Some((_, Some(dir))) = Self::open_volume(root, markers, id, at)? else {
                return Ok(false);
            };
            let stat = rustix::fs::fstat(&dir).map_err(|e| io(at, e))?;
            let fs_type = rustix::fs::fstatfs(&dir).map_err(|e| io(at, e))?.f_type;
            Ok(stat.st_ino == state.ino && fs_type == staged_type)
        })
    }

    fn publish_source(
        &self,
        _id: &VolumeId,
        staging: Option<&ConfinedPath>,
        _readonly: bool,
    ) -> Result<PublishSource, BackendError> {
        let staging = staging.ok_or_else(|| {
            BackendError::Unsupported("shared volumes must be staged first".into())
        })?;
        Ok(PublishSource::Directory(staging.absolute()))
    }

    // Snapshots live on the share (see [`snapshots`]); the engine finds them by ID, so there
    // is nothing to list or recover locally, and no local directory to sync.

    fn supports_snapshots(&self) -> bool {
        true
    }

    fn snapshot(
        &self,
        source: &VolumeId,
        snapshot: &SnapshotId,
        _cancel: &Cancel,
    ) -> Result<Mechanism, BackendError> {
        // Shares are never copied in the background (see the engine): nothing cancels this.
        self.take_snapshot(source, snapshot)
    }

    fn delete_snapshot(&self, snapshot: &SnapshotId) -> Result<(), BackendError> {
        self.remove_snapshot(snapshot)
    }

    fn snapshot_exists(&self, snapshot: &SnapshotId) -> Result<bool, BackendError> {
        Ok(self.find_snapshot(snapshot)?.is_some())
    }

    fn stored_snapshot(
        &self,
        snapshot: &SnapshotId,
    ) -> Result<Option<StoredSnapshot>, BackendError> {
        self.find_snapshot(snapshot)
    }

    fn create_from(
        &self,
        id: &VolumeId,
        source: ContentSource<'_>,
        options: &VolumeOptions,
    ) -> Result<(Enforcement, Mechanism), BackendError> {
        self.populate(id, source, options)
    }
}

#[cfg(test)]
mod tests;
