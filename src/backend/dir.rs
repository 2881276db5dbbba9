//! The `dir` backend: each volume is a directory `<data-dir>/volumes/<volume-id>`.
//!
//! Capacity is recorded, not enforced (enforcement through btrfs qgroups and project quotas is
//! a later backend option). Usage is measured by walking the tree without crossing into other
//! filesystems or following symlinks.

use std::collections::HashSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{Backend, BackendError, FsCapacity, Usage};
use crate::engine::ids::VolumeId;

/// Mode of a new volume's root: writable by any pod user, as Kubernetes expects of a fresh
/// volume when no fsGroup is set. The data directory above it is 0700 and root-owned, so the
/// volume is reachable only through its mounts.
const VOLUME_DIR_MODE: u32 = 0o777;

/// Node-local directories.
#[derive(Debug, Clone)]
pub struct DirBackend {
    volumes: PathBuf,
}

impl DirBackend {
    /// Prepares `<data_dir>/volumes` (mode 0700).
    pub fn new(data_dir: &Path) -> Result<DirBackend, BackendError> {
        let volumes = data_dir.join("volumes");
        std::fs::create_dir_all(&volumes).map_err(|e| BackendError::io("mkdir", &volumes, e))?;
        std::fs::set_permissions(&volumes, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| BackendError::io("chmod", &volumes, e))?;
        Ok(DirBackend { volumes })
    }
}

impl Backend for DirBackend {
    fn name(&self) -> &'static str {
        "dir"
    }

    fn create(&self, id: &VolumeId, _capacity_bytes: u64) -> Result<(), BackendError> {
        let path = self.volume_path(id);
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
        // Explicit chmod: the process umask must not decide what pods can write.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(VOLUME_DIR_MODE))
            .map_err(|e| BackendError::io("chmod", &path, e))
    }

    fn delete(&self, id: &VolumeId) -> Result<(), BackendError> {
        let path = self.volume_path(id);
        // std's remove_dir_all never follows symlinks inside the tree.
        match std::fs::remove_dir_all(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(BackendError::io("remove", &path, e)),
        }
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
        let st = rustix::fs::statvfs(&self.volumes)
            .map_err(|e| BackendError::io("statvfs", &self.volumes, e.into()))?;
        Ok(FsCapacity {
            total_bytes: st.f_blocks.saturating_mul(st.f_frsize),
            available_bytes: st.f_bavail.saturating_mul(st.f_frsize),
            total_inodes: st.f_files,
            free_inodes: st.f_favail,
        })
    }

    fn usage(&self, id: &VolumeId) -> Result<Usage, BackendError> {
        let root = self.volume_path(id);
        let root_meta =
            std::fs::symlink_metadata(&root).map_err(|e| BackendError::io("stat", &root, e))?;
        let device = root_meta.dev();
        let mut usage = Usage {
            used_bytes: root_meta.blocks() * 512,
            used_inodes: 1,
        };
        let mut seen_links: HashSet<u64> = HashSet::new();
        let mut pending = vec![root];
        while let Some(dir) = pending.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                // Entries may vanish while a pod works in the volume; count what is there.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(BackendError::io("readdir", &dir, e)),
            };
            for entry in entries.flatten() {
                let Ok(meta) = entry.metadata() else { continue };
                if meta.dev() != device {
                    continue; // another filesystem mounted inside: not ours to count
                }
                if meta.nlink() > 1 && !meta.is_dir() && !seen_links.insert(meta.ino()) {
                    continue; // a hard link we already counted
                }
                usage.used_bytes += meta.blocks() * 512;
                usage.used_inodes += 1;
                if meta.is_dir() {
                    pending.push(entry.path());
                }
            }
        }
        Ok(usage)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_is_idempotent_and_usage_counts_files() {
        let data = tempfile::tempdir().unwrap();
        let backend = DirBackend::new(data.path()).unwrap();
        let id = VolumeId::for_name(backend.name(), "pvc-1");
        backend.create(&id, 0).unwrap();
        backend.create(&id, 0).unwrap();
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
        assert!(backend.create(&id, 0).is_err());
        assert!(!backend.exists(&id).unwrap());
    }
}
