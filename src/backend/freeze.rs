//! Freezing a mounted filesystem for the instant a snapshot is cut (`fsfreeze -f`, then
//! `fsfreeze -u`): the kernel flushes the filesystem and blocks new writes, so the image file
//! below it is consistent while it is reflinked or copied. There is no safe ioctl wrapper for
//! FIFREEZE/FITHAW and this crate forbids `unsafe`, so util-linux's `fsfreeze` does it.
//!
//! A frozen filesystem stays frozen if this process dies, so [`Frozen`] thaws on drop and
//! start-up recovery thaws every mounted volume ([`thaw`] of a filesystem that is not frozen
//! is harmless).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::BackendError;
use super::shared::mounts::{CommandError, run_with_timeout};
use crate::mount::mountinfo;

/// How long `fsfreeze` may take: freezing flushes the filesystem, and a filesystem whose
/// device or server is dead never finishes; the command is killed then and the snapshot fails
/// instead of holding the volume (and a blocking thread) for ever.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(60);

fn fsfreeze(flag: &str, mount_point: &Path) -> Result<(), String> {
    let args = [flag.to_string(), mount_point.to_string_lossy().into_owned()];
    match run_with_timeout("fsfreeze", &args, FREEZE_TIMEOUT) {
        Ok(()) => Ok(()),
        Err(CommandError::Failed { stderr, .. }) => Err(stderr),
        Err(other) => Err(other.to_string()),
    }
}

/// A frozen filesystem; thawed when dropped.
#[derive(Debug)]
pub struct Frozen {
    mount_point: PathBuf,
}

/// Freezes the filesystem mounted at `mount_point`.
pub fn freeze(mount_point: &Path) -> Result<Frozen, BackendError> {
    fsfreeze("-f", mount_point).map_err(|stderr| BackendError::Command {
        command: "fsfreeze -f".into(),
        path: mount_point.to_path_buf(),
        stderr,
    })?;
    Ok(Frozen {
        mount_point: mount_point.to_path_buf(),
    })
}

/// Thaws the filesystem at `mount_point`; one that is not frozen is left as it is.
pub fn thaw(mount_point: &Path) -> Result<(), String> {
    match fsfreeze("-u", mount_point) {
        Ok(()) => Ok(()),
        // EINVAL: not frozen.
        Err(stderr) if stderr.contains("Invalid argument") => Ok(()),
        Err(stderr) => Err(stderr),
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Err(e) = thaw(&self.mount_point) {
            tracing::error!(mount_point = %self.mount_point.display(), error = %e,
                "could not thaw a filesystem frozen for a snapshot");
        }
    }
}

/// Where the filesystem on block device `device` is mounted in this process's namespace
/// (any of its mounts: freezing one freezes the filesystem).
pub fn mount_point_of(device: &Path) -> Result<Option<PathBuf>, BackendError> {
    let st = rustix::fs::stat(device).map_err(|e| BackendError::io("stat", device, e.into()))?;
    let wanted = format!(
        "{}:{}",
        rustix::fs::major(st.st_rdev),
        rustix::fs::minor(st.st_rdev)
    );
    let entries = mountinfo::read().map_err(|e| BackendError::io("read mountinfo", device, e))?;
    Ok(entries
        .into_iter()
        .find(|e| e.major_minor == wanted)
        .map(|e| e.mount_point))
}
