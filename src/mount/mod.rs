//! The mount layer: bind mounts at confined paths, behind the [`Mounter`] trait.
//!
//! [`linux::LinuxMounter`] does it for real with the new mount API (`open_tree` + `move_mount`)
//! onto a directory file descriptor that was resolved beneath the kubelet directory with
//! `openat2(RESOLVE_NO_SYMLINKS)`, so a symlink planted at or above the target is refused rather
//! than followed. [`fake::FakeMounter`] records calls so the engine's mount logic is unit-testable
//! without root.

pub mod durability;
pub mod fake;
pub mod linux;
pub mod mountinfo;
pub mod paths;
pub mod probe;
mod setattr;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

pub use paths::{ConfinedPath, PathError};
pub use probe::{Hung, Probes};

/// Runs `work` on its own thread and waits at most `timeout` for its result. `None` means it
/// did not finish in time; the thread is left to finish (or hang) on its own. A syscall stuck on
/// a dead network filesystem cannot be cancelled, so this is how callers stay responsive: the
/// stuck thread is a plain OS thread, not one of the runtime's bounded blocking-pool threads.
pub fn with_timeout<T: Send + 'static>(
    timeout: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("k8scsi-mount-io".into())
        .spawn(move || {
            let _ = tx.send(work());
        })
        .ok()?;
    rx.recv_timeout(timeout).ok()
}

impl Hung {
    /// The mount error saying that `op` on `path` hung.
    pub fn error(self, op: &'static str, path: PathBuf, timeout: Duration) -> MountError {
        match self {
            Hung::TimedOut => MountError::TimedOut { op, path, timeout },
            Hung::Still => MountError::StillHung { op, path, timeout },
        }
    }
}

/// What is found at a confined path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathState {
    /// Device of the inode found there (after crossing any mount on it).
    pub dev: u64,
    /// Inode number found there.
    pub ino: u64,
    /// Whether something is mounted on the path.
    pub is_mount_point: bool,
    /// Whether the inode is a directory.
    pub is_dir: bool,
}

/// Per-mount flags a bind mount is (re)mounted with; parsed from CSI `mount_flags`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountOptions {
    pub readonly: bool,
    pub nosuid: bool,
    pub nodev: bool,
    pub noexec: bool,
    pub atime: Option<AtimeMode>,
    pub nodiratime: bool,
    pub sync: bool,
    pub dirsync: bool,
}

/// Access-time behaviour of a mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtimeMode {
    NoAtime,
    RelAtime,
    StrictAtime,
}

impl MountOptions {
    /// Parses CSI mount flags. Only per-mount-point flags a bind mount can honour are accepted;
    /// anything else (including filesystem data options that could smuggle in a different
    /// source) is refused with the offending flag.
    pub fn from_flags(flags: &[String], readonly: bool) -> Result<MountOptions, String> {
        let mut o = MountOptions {
            readonly,
            ..Default::default()
        };
        for flag in flags {
            // Kubernetes passes PV mountOptions one per entry, but comma lists are common in
            // hand-written specs; split them and judge each piece.
            for piece in flag.split(',') {
                match piece.trim() {
                    "" | "defaults" | "bind" | "rw" => {}
                    "ro" => o.readonly = true,
                    "nosuid" => o.nosuid = true,
                    "nodev" => o.nodev = true,
                    "noexec" => o.noexec = true,
                    "noatime" => o.atime = Some(AtimeMode::NoAtime),
                    "relatime" => o.atime = Some(AtimeMode::RelAtime),
                    "strictatime" => o.atime = Some(AtimeMode::StrictAtime),
                    "nodiratime" => o.nodiratime = true,
                    "sync" => o.sync = true,
                    "dirsync" => o.dirsync = true,
                    other => return Err(format!("mount flag {other:?} is not supported")),
                }
            }
        }
        Ok(o)
    }

    /// The first flag here that belongs to a whole filesystem (`sync`, `dirsync`): a bind mount
    /// cannot change it, so only a volume with a filesystem of its own can honour it.
    pub fn filesystem_wide_flag(&self) -> Option<&'static str> {
        if self.sync {
            Some("sync")
        } else if self.dirsync {
            Some("dirsync")
        } else {
            None
        }
    }

    /// The filesystem-wide flags of these options alone, for mounting a volume's own filesystem.
    pub fn filesystem_wide(&self) -> MountOptions {
        MountOptions {
            sync: self.sync,
            dirsync: self.dirsync,
            ..MountOptions::default()
        }
    }

    /// Whether a bind mount needs its flags set to apply these options (on the detached tree
    /// before it is attached, or by a remount after it on kernels without `mount_setattr`).
    pub fn needs_remount(&self) -> bool {
        *self != MountOptions::default()
    }
}

/// Failures of the mount layer.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// A path component is a symlink (or a magic link); we never follow those.
    #[error("{path}: a symlink is in the way; refusing to follow it")]
    Symlink { path: PathBuf },
    /// The parent of a target does not exist; the CO must create it.
    #[error("parent directory of {path} does not exist")]
    ParentMissing { path: PathBuf },
    /// A path exists but is not a directory.
    #[error("{path} is not a directory")]
    NotADirectory { path: PathBuf },
    /// The path is not a mount point but holds files; we do not delete what we did not create.
    #[error("{path} is not a mount point and is not empty; leaving it alone")]
    NotEmpty { path: PathBuf },
    /// A call on the path did not return in time (a dead server behind it, usually).
    #[error("{op} {path} did not finish within {timeout:?}")]
    TimedOut {
        op: &'static str,
        path: PathBuf,
        timeout: Duration,
    },
    /// An earlier call on the path hung and is still blocked, so no new one was started (each
    /// would block the same way and pin one more thread).
    #[error(
        "{op} {path}: an earlier call on it has not returned for over {timeout:?}; the \
             filesystem behind it is not answering"
    )]
    StillHung {
        op: &'static str,
        path: PathBuf,
        timeout: Duration,
    },
    /// Any other system call failure.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The mount operations the engine needs.
pub trait Mounter: Send + Sync + 'static {
    /// What is at `path`, or `None` if nothing is. Fails with [`MountError::Symlink`] when the
    /// path or one of its parents below the root is a symlink.
    fn inspect(&self, path: &ConfinedPath) -> Result<Option<PathState>, MountError>;

    /// Bind-mounts `source` (a trusted directory or block device node of ours) on `target`
    /// with `options`, creating the target (a directory, or a file for a device) if needed.
    fn bind(
        &self,
        source: &Path,
        target: &ConfinedPath,
        options: &MountOptions,
    ) -> Result<(), MountError>;

    /// Creates the target directory if needed and mounts the filesystem on `device` there.
    fn mount_device(
        &self,
        device: &Path,
        fs_type: &str,
        target: &ConfinedPath,
        options: &MountOptions,
    ) -> Result<(), MountError>;

    /// Unmounts whatever is mounted on `target` (one layer).
    fn unmount(&self, target: &ConfinedPath) -> Result<(), MountError>;

    /// Detaches whatever is mounted on `target` lazily (`MNT_DETACH`): it leaves the namespace
    /// at once without waiting for the filesystem, and is released once nothing uses it.
    fn detach(&self, target: &ConfinedPath) -> Result<(), MountError>;

    /// Removes the (empty, unmounted) target directory; a missing one is fine.
    fn remove_target(&self, target: &ConfinedPath) -> Result<(), MountError>;

    /// The (device, inode) a trusted directory of ours shows once it is bind-mounted
    /// somewhere; [`Mounter::inspect`] of a target holding it reports the same pair.
    fn identity(&self, dir: &Path) -> std::io::Result<(u64, u64)>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_supported_flags_and_refuses_others() {
        let o =
            MountOptions::from_flags(&["noexec,nosuid".into(), "noatime".into()], false).unwrap();
        assert!(o.noexec && o.nosuid && !o.readonly);
        assert_eq!(o.atime, Some(AtimeMode::NoAtime));
        assert!(
            MountOptions::from_flags(&["ro".into()], false)
                .unwrap()
                .readonly
        );
        assert!(
            !MountOptions::from_flags(&[], false)
                .unwrap()
                .needs_remount()
        );
        for bad in [
            "source=/etc",
            "uid=0",
            "remount",
            "x-mount.mkdir",
            "subvol=/",
        ] {
            assert!(
                MountOptions::from_flags(&[bad.to_string()], false).is_err(),
                "{bad}"
            );
        }
    }
}
