//! Mounting shares without letting a dead server take the process down.
//!
//! A share is mounted by the `mount` program (NFS and CIFS need their mount helpers) in a
//! child process that gets [`ShareMounts::timeout`] to finish; a mount that hangs is killed and
//! reported, and the caller gets an error instead of a blocked thread. Unmounts run on their own
//! thread; one that does not return in time is replaced by a lazy unmount (`MNT_DETACH`), which
//! never waits for the server, and that is logged as a warning.
//!
//! The controller mounts a share only while it works on it: [`ShareMounts::acquire`] mounts on
//! first use and the last [`ShareGuard`] dropped unmounts it. Each share has its own lock, so a
//! hung share never delays work on another.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::mount::UnmountFlags;

use super::spec::ShareRef;
use crate::backend::BackendError;
use crate::mount::mountinfo;

/// How long a mount or unmount of a share may take by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

pub use crate::mount::with_timeout;

/// Why running a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("could not start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} did not finish within {timeout:?} and was killed")]
    TimedOut { program: String, timeout: Duration },
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        program: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// Runs `program args` and waits at most `timeout`; the child is killed when it overruns.
pub fn run_with_timeout(
    program: &str,
    args: &[String],
    timeout: Duration,
) -> Result<(), CommandError> {
    let mut command = Command::new(program);
    command.args(args);
    run_command_with_timeout(command, program, timeout)
}

/// [`run_with_timeout`] for a command already built (for example under `setpriv`, see
/// `loopdev::tool`); `program` names it in errors.
pub fn run_command_with_timeout(
    mut command: Command,
    program: &str,
    timeout: Duration,
) -> Result<(), CommandError> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| CommandError::Spawn {
            program: program.to_string(),
            source,
        })?;
    let deadline = Instant::now() + timeout;
    // Mounts usually finish in a few milliseconds: poll quickly at first, then back off.
    let mut pause = Duration::from_micros(500);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let mut stderr = String::new();
                if let Some(mut pipe) = child.stderr.take() {
                    let _ = pipe.read_to_string(&mut stderr);
                }
                if status.success() {
                    return Ok(());
                }
                return Err(CommandError::Failed {
                    program: program.to_string(),
                    status,
                    stderr: stderr.trim().to_string(),
                });
            }
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            _ => {
                let _ = child.kill();
                // Reap it whenever it dies (a process stuck in the kernel dies only when the
                // server answers), without waiting here.
                std::thread::spawn(move || {
                    let _ = child.wait();
                });
                return Err(CommandError::TimedOut {
                    program: program.to_string(),
                    timeout,
                });
            }
        }
    }
}

/// How an unmount ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmounted {
    /// Unmounted normally.
    Clean,
    /// Nothing was mounted there.
    NotMounted,
    /// The unmount hung (or the mount was busy where that is allowed) and the mount was
    /// detached lazily: it disappears from the namespace now and is released once unused.
    Lazily,
}

/// Unmounts `path` (no symlink following at the last component), falling back to a lazy
/// unmount when the unmount does not return within `timeout`, or when it is busy and
/// `lazy_if_busy` says a busy mount may be detached.
pub fn unmount_with_timeout(
    path: &Path,
    timeout: Duration,
    lazy_if_busy: bool,
) -> Result<Unmounted, BackendError> {
    let p = path.to_path_buf();
    let outcome = with_timeout(timeout, move || {
        rustix::mount::unmount(&p, UnmountFlags::NOFOLLOW)
    });
    let detach = |why: &str| -> Result<Unmounted, BackendError> {
        tracing::warn!(path = %path.display(), reason = why,
            "unmount did not complete; detached the mount lazily (MNT_DETACH)");
        rustix::mount::unmount(path, UnmountFlags::NOFOLLOW | UnmountFlags::DETACH)
            .map_err(|e| BackendError::io("umount -l", path, e.into()))?;
        Ok(Unmounted::Lazily)
    };
    match outcome {
        Some(Ok(())) => Ok(Unmounted::Clean),
        Some(Err(rustix::io::Errno::INVAL)) => Ok(Unmounted::NotMounted),
        Some(Err(rustix::io::Errno::BUSY)) if lazy_if_busy => detach("busy"),
        Some(Err(e)) => Err(BackendError::io("umount", path, e.into())),
        None => detach(&format!("hung for more than {timeout:?}")),
    }
}

/// Whether something is mounted exactly at `path`, from the mount table (which never touches
/// the mounted filesystem, so a dead server cannot block this check).
pub fn is_mount_point(path: &Path) -> bool {
    mountinfo::read()
        .map(|table| table.iter().any(|e| e.mount_point == path))
        .unwrap_or(false)
}

#[derive(Debug, Default)]
struct Entry {
    users: usize,
    mounted: bool,
}

/// Reference-counted private mounts of shares under one directory (`<data-dir>/shares`).
#[derive(Debug)]
pub struct ShareMounts {
    dir: PathBuf,
    timeout: Duration,
    program: String,
    entries: Mutex<HashMap<String, Arc<Mutex<Entry>>>>,
}

/// A share mounted for as long as the guard lives.
#[derive(Debug)]
pub struct ShareGuard {
    mounts: Arc<ShareMounts>,
    key: String,
    entry: Arc<Mutex<Entry>>,
    path: PathBuf,
}

impl ShareGuard {
    /// Where the share's root is mounted.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ShareGuard {
    fn drop(&mut self) {
        self.mounts.release(&self.key, &self.entry, &self.path);
    }
}

impl ShareMounts {
    /// Mounts go under `dir` (created 0700). Mounts left there by a previous process that
    /// died are detached first: nothing else mounts there.
    pub fn new(dir: &Path, timeout: Duration, program: &str) -> Result<ShareMounts, BackendError> {
        crate::backend::private_dir(dir)?;
        if let Ok(table) = mountinfo::read() {
            for entry in table.iter().filter(|e| e.mount_point.parent() == Some(dir)) {
                tracing::warn!(path = %entry.mount_point.display(),
                    "detaching a share mount left by an earlier process");
                let _ = rustix::mount::unmount(
                    &entry.mount_point,
                    UnmountFlags::NOFOLLOW | UnmountFlags::DETACH,
                );
            }
        }
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_dir(entry.path());
            }
        }
        Ok(ShareMounts {
            dir: dir.to_path_buf(),
            timeout,
            program: program.to_string(),
            entries: Mutex::default(),
        })
    }

    /// The mount and unmount timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Mounts `share` at `target` with the `mount` program, within the timeout.
    pub fn mount_at(&self, share: &ShareRef, target: &Path) -> Result<(), BackendError> {
        let args = share.mount_args(target);
        tracing::debug!(program = %self.program, ?args, "mounting share");
        run_with_timeout(&self.program, &args, self.timeout).map_err(|e| {
            if matches!(e, CommandError::TimedOut { .. }) {
                // The mount may still complete later; make sure it does not linger.
                let _ =
                    rustix::mount::unmount(target, UnmountFlags::NOFOLLOW | UnmountFlags::DETACH);
            }
            BackendError::Command {
                command: format!("mount {}", share.display()),
                path: target.to_path_buf(),
                stderr: e.to_string(),
            }
        })
    }

    /// Mounts `share` (unless this process already has it mounted) and returns a guard.
    pub fn acquire(self: &Arc<Self>, share: &ShareRef) -> Result<ShareGuard, BackendError> {
        let key = share.key();
        let entry = self
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        let path = self.dir.join(&key);
        let mut state = entry.lock().unwrap_or_else(|p| p.into_inner());
        if !state.mounted {
            if is_mount_point(&path) {
                // A mount that timed out earlier and completed later.
                let _ =
                    rustix::mount::unmount(&path, UnmountFlags::NOFOLLOW | UnmountFlags::DETACH);
            }
            match std::fs::create_dir(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(BackendError::io("mkdir", &path, e)),
            }
            self.mount_at(share, &path)?;
            state.mounted = true;
        }
        state.users += 1;
        drop(state);
        Ok(ShareGuard {
            mounts: self.clone(),
            key,
            entry,
            path,
        })
    }

    fn release(&self, key: &str, entry: &Arc<Mutex<Entry>>, path: &Path) {
        let mut state = entry.lock().unwrap_or_else(|p| p.into_inner());
        state.users -= 1;
        if state.users > 0 || !state.mounted {
            return;
        }
        match unmount_with_timeout(path, self.timeout, true) {
            Ok(_) => {
                state.mounted = false;
                let _ = std::fs::remove_dir(path);
            }
            Err(e) => {
                tracing::warn!(share = key, error = %e, "could not unmount a share");
            }
        }
    }

    /// How many shares this process has mounted right now (for tests and diagnostics).
    pub fn mounted(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|e| e.lock().map(|s| s.mounted).unwrap_or(false))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hung_command_is_killed_at_the_timeout() {
        // `sleep 600` would outlast any test run: only the timeout can end this call.
        let result = run_with_timeout("sleep", &["600".into()], Duration::from_millis(200));
        assert!(
            matches!(result, Err(CommandError::TimedOut { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn failures_carry_stderr_and_success_is_ok() {
        run_with_timeout("true", &[], Duration::from_secs(20)).unwrap();
        match run_with_timeout(
            "sh",
            &["-c".into(), "echo no such share >&2; exit 32".into()],
            Duration::from_secs(20),
        ) {
            Err(CommandError::Failed { stderr, .. }) => assert_eq!(stderr, "no such share"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            run_with_timeout("/nonexistent/mount", &[], Duration::from_secs(1)),
            Err(CommandError::Spawn { .. })
        ));
    }

    #[test]
    fn work_that_overruns_is_abandoned() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        // Blocks until the test lets it go, like an unmount stuck on a dead server.
        let result = with_timeout(Duration::from_millis(100), move || {
            let _ = rx.recv();
            1
        });
        assert_eq!(result, None);
        drop(tx);
        assert_eq!(with_timeout(Duration::from_secs(20), || 7), Some(7));
    }

    #[test]
    fn unmounting_what_is_not_mounted_is_reported() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("SKIPPED: needs root for umount(2)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            unmount_with_timeout(dir.path(), Duration::from_secs(20), false).unwrap(),
            Unmounted::NotMounted
        );
    }
}
