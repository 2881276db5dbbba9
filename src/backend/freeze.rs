//! Freezing a mounted filesystem for the instant a snapshot is cut (`fsfreeze -f`, then
//! `fsfreeze -u`): the kernel flushes the filesystem and blocks new writes, so the image file
//! below it is consistent while it is reflinked or copied. There is no safe ioctl wrapper for
//! FIFREEZE/FITHAW and this crate forbids `unsafe`, so util-linux's `fsfreeze` does it.
//!
//! A frozen filesystem stays frozen if this process dies, so [`Frozen`] thaws on drop and
//! start-up recovery thaws every mounted volume ([`thaw_after_crash`]; a thaw of a filesystem
//! that is not frozen is harmless).
//!
//! `fsfreeze` runs under `setpriv --pdeathsig KILL`, but a kill cannot stop it inside the
//! FIFREEZE ioctl, which completes first (it syncs the filesystem, which takes a while on a
//! loaded disk). So a `fsfreeze -f` of a killed driver could freeze the filesystem *after* the
//! restarted driver thawed it, and nothing would thaw it again: pods writing to it would hang
//! and every later snapshot of it failed with EBUSY (found by tests/crash_mixed.rs). Recovery
//! therefore waits for such a leftover `fsfreeze` to be gone before it thaws.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::BackendError;
use super::shared::mounts::{CommandError, run_command_with_timeout};
use crate::mount::mountinfo;

/// How long start-up recovery waits for a `fsfreeze` left by a killed driver.
const LEFTOVER_DEADLINE: Duration = Duration::from_secs(60);

/// How long `fsfreeze` may take: freezing flushes the filesystem, and a filesystem whose
/// device or server is dead never finishes; the command is killed then and the snapshot fails
/// instead of holding the volume (and a blocking thread) for ever.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(60);

fn fsfreeze(flag: &str, mount_point: &Path) -> Result<(), String> {
    // Under `setpriv --pdeathsig`: a freeze of a killed driver must not outlive it.
    let mut command = super::loopdev::tool("fsfreeze");
    command.arg(flag).arg(mount_point);
    match run_command_with_timeout(command, "fsfreeze", FREEZE_TIMEOUT) {
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

/// Every mount point of the filesystem on block device `device` in this process's namespace.
fn mount_points_of(device: &Path) -> Result<Vec<PathBuf>, BackendError> {
    let st = rustix::fs::stat(device).map_err(|e| BackendError::io("stat", device, e.into()))?;
    let wanted = format!(
        "{}:{}",
        rustix::fs::major(st.st_rdev),
        rustix::fs::minor(st.st_rdev)
    );
    let entries = mountinfo::read().map_err(|e| BackendError::io("read mountinfo", device, e))?;
    Ok(entries
        .into_iter()
        .filter(|e| e.major_minor == wanted)
        .map(|e| e.mount_point)
        .collect())
}

/// Where the filesystem on block device `device` is mounted in this process's namespace
/// (any of its mounts: freezing one freezes the filesystem).
pub fn mount_point_of(device: &Path) -> Result<Option<PathBuf>, BackendError> {
    Ok(mount_points_of(device)?.into_iter().next())
}

/// Process IDs of `fsfreeze` processes working on one of `mount_points` (directly or under
/// `setpriv`), from `/proc/<pid>/cmdline`.
fn freezers_of(mount_points: &[PathBuf]) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = raw.split(|&b| b == 0).collect();
            let runs_fsfreeze = args
                .iter()
                .any(|a| a.rsplit(|&b| b == b'/').next() == Some(b"fsfreeze".as_slice()));
            runs_fsfreeze
                && mount_points.iter().any(|m| {
                    let m = m.as_os_str().as_encoded_bytes();
                    args.contains(&m)
                })
        })
        .collect()
}

/// Start-up recovery of the filesystem on `device`: waits (up to a minute) until no
/// `fsfreeze` left by a killed driver works on it any more, then thaws it.
pub fn thaw_after_crash(device: &Path) -> Result<(), String> {
    let mount_points = mount_points_of(device).map_err(|e| e.to_string())?;
    let Some(first) = mount_points.first() else {
        return Ok(());
    };
    let started = Instant::now();
    let mut warned = false;
    loop {
        let left = freezers_of(&mount_points);
        if left.is_empty() {
            break;
        }
        if !warned {
            tracing::warn!(mount_point = %first.display(), pids = ?left,
                "waiting for a fsfreeze left by the killed driver before thawing");
            warned = true;
        }
        if started.elapsed() > LEFTOVER_DEADLINE {
            return Err(format!(
                "fsfreeze processes {left:?} of an earlier driver still work on {} after {:?}",
                first.display(),
                LEFTOVER_DEADLINE
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    thaw(first)
}
