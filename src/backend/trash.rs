//! Deleted volume directories, removed in the background.
//!
//! Removing a directory frees its inode and blocks, and on a filesystem mounted with `discard`
//! the `rmdir` waits for the device to discard them: it was the slowest step of a DeleteVolume of
//! the `dir` backend, and a volume holding a large tree can take minutes to remove. With a
//! [`Trash`], DeleteVolume renames `volumes/<id>` into `<data-dir>/trash` and returns; a
//! background thread removes what is in the trash.
//!
//! Durability does not change: the engine still fsyncs `volumes/` in the group commit that
//! records the delete, so the volume is durably gone from `volumes/` before DeleteVolume
//! answers. The trash needs no fsync: whatever is in it at start (after a crash or a restart) is
//! removed again. The trash is root-only (0700) and on the volumes' filesystem (a rename cannot
//! cross filesystems); reconciliation only looks at `volumes/`, so nothing in the trash is
//! mistaken for a volume. Until the thread has removed a directory its space still counts as
//! used.
//!
//! Entries go into [`BINS`] subdirectories of the trash in turn (`trash/bin-<n>/<name>`). An
//! `rmdir` holds its parent directory locked until the freed block is discarded, and a rename
//! into that same parent waits for it while holding `volumes/` locked, which stalls every
//! CreateVolume's `mkdir` behind one discard. With bins, the entry being removed is almost
//! never in the bin the next delete renames into.

use std::collections::VecDeque;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use rustix::fs::{self as rfs, AtFlags, CWD, RenameFlags};
use rustix::io::Errno;

use crate::mount::Probes;

/// Name of the trash directory inside the data directory.
pub const TRASH_DIR: &str = "trash";

/// How many bins deleted directories are spread over.
pub const BINS: u64 = 16;

/// Prefix of a bin's name (`bin-0` .. `bin-f`). Names of entries left by versions without
/// bins are hexadecimal numbers, so the two never collide.
const BIN_PREFIX: &str = "bin-";

/// How long removing one deleted tree may take before the thread moves on to the next entry
/// (a hung mount left inside a deleted volume must not stop the removal of everything else).
const REMOVAL_TIMEOUT: Duration = Duration::from_secs(30);

/// The trash of one data directory and its removal thread.
#[derive(Debug)]
pub struct Trash {
    dir: PathBuf,
    state: Mutex<State>,
    wake: Condvar,
    /// Makes names in the trash unique.
    sequence: AtomicU64,
    /// Runs the removal of a whole tree, bounded (a hung mount may be left inside it).
    probes: Arc<Probes>,
}

#[derive(Debug, Default)]
struct State {
    /// Names in the trash not yet removed, oldest first.
    pending: VecDeque<String>,
    /// Entries at the front of `pending` whose removal failed or hung; left until restart.
    given_up: usize,
}

impl Trash {
    /// Prepares `<data_dir>/trash` (mode 0700), queues what an earlier run left in it, and
    /// starts the removal thread (which ends when the last handle is dropped).
    pub fn start(data_dir: &Path) -> std::io::Result<Arc<Trash>> {
        let dir = data_dir.join(TRASH_DIR);
        // The trash is written into and emptied as root: it must be a directory of its own,
        // not a link to somewhere else.
        if std::fs::symlink_metadata(&dir).is_ok_and(|m| !m.is_dir()) {
            return Err(std::io::Error::other(format!(
                "{} exists and is not a directory; move it away so the trash can be made",
                dir.display()
            )));
        }
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let mut pending = VecDeque::new();
        let mut displaced = 0u64;
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            // Names that are not UTF-8 were never made here; they are left alone.
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if name.starts_with(BIN_PREFIX) && !entry.file_type()?.is_dir() {
                // A file or symlink where a bin belongs (nothing of ours): a rename through a
                // symlink would move deleted volumes out of the trash. Moved to the top level,
                // where it is removed like any leftover, and the bin is made in its place.
                let aside = format!("displaced-{name}-{started:x}-{displaced}");
                displaced += 1;
                std::fs::rename(dir.join(&name), dir.join(&aside))?;
                tracing::warn!(path = %dir.join(&name).display(),
                    "not a directory where a trash bin belongs; removing it");
                pending.push_back(aside);
            } else if name.starts_with(BIN_PREFIX) {
                for inner in std::fs::read_dir(dir.join(&name))? {
                    if let Ok(inner) = inner?.file_name().into_string() {
                        pending.push_back(format!("{name}/{inner}"));
                    }
                }
            } else {
                // Left by a version without bins.
                pending.push_back(name);
            }
        }
        for bin in 0..BINS {
            make_private_dir(&dir.join(bin_name(bin)))?;
        }
        if !pending.is_empty() {
            tracing::info!(entries = pending.len(), trash = %dir.display(),
                "removing deleted volume directories left by an earlier run");
        }
        let trash = Arc::new(Trash {
            dir,
            state: Mutex::new(State {
                pending,
                given_up: 0,
            }),
            wake: Condvar::new(),
            sequence: AtomicU64::new(started),
            probes: Arc::new(Probes::default()),
        });
        let weak = Arc::downgrade(&trash);
        std::thread::Builder::new()
            .name("trash-remover".into())
            .spawn(move || run(weak))?;
        Ok(trash)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves `path` into the trash with one rename. `Ok(false)` when `path` does not exist.
    /// On error (`EBUSY` for a mount point, `EXDEV` for another filesystem) nothing moved.
    pub fn put(&self, path: &Path) -> rustix::io::Result<bool> {
        let name = self.next_name();
        let target = self.dir.join(&name);
        let rename = || rfs::renameat_with(CWD, path, CWD, &target, RenameFlags::NOREPLACE);
        let mut moved = rename();
        if moved == Err(Errno::NOENT) && rfs::statat(CWD, path, AtFlags::SYMLINK_NOFOLLOW).is_ok() {
            // The volume is there, so the bin is not: someone removed it (or the whole trash)
            // by hand. Make it again and retry once, rather than report the volume gone.
            if let Some(bin) = target.parent() {
                make_private_dir(bin).map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::IO))?;
            }
            moved = rename();
        }
        match moved {
            Ok(()) => {
                self.lock().pending.push_back(name);
                self.wake.notify_one();
                Ok(true)
            }
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// A new entry's name relative to the trash: the bins are used in turn.
    fn next_name(&self) -> String {
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        format!("{}/{sequence:x}", bin_name(sequence % BINS))
    }

    /// Entries not yet removed, and of those the ones given up on until restart.
    pub fn backlog(&self) -> (usize, usize) {
        let state = self.lock();
        (state.pending.len(), state.given_up)
    }

    /// Removes one entry; `false` if it is still there.
    fn remove(&self, name: &str) -> bool {
        let path = self.dir.join(name);
        // Most deleted volumes are empty or nearly so.
        match std::fs::remove_dir(&path) {
            Ok(()) => return true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return true,
            Err(_) => {}
        }
        // A file or symlink displaced from a bin's place: unlinked, never followed.
        if std::fs::symlink_metadata(&path).is_ok_and(|m| !m.is_dir()) {
            return std::fs::remove_file(&path).is_ok();
        }
        // A tree: bounded like every other look at a volume (a worker thread, waited for at
        // most REMOVAL_TIMEOUT). Never follows symlinks inside the tree, and does not recurse:
        // std's remove_dir_all does, and a tree nested deeper than the worker's stack would
        // abort the server, at every start again while it stays in the trash.
        let key = path.to_string_lossy().into_owned();
        let tree = path.clone();
        match self.probes.run(&key, REMOVAL_TIMEOUT, move || {
            if super::btrfs::is_subvolume(&tree) {
                // Made while quotas could be enabled: another device to the walk, which never
                // crosses one, so removed as it always was.
                return std::fs::remove_dir_all(&tree);
            }
            super::shared::tree::remove_path(&tree)
        }) {
            Ok(Ok(())) => true,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => true,
            Ok(Err(e)) => {
                tracing::warn!(path = %path.display(), error = %e,
                    "cannot remove a deleted volume's directory; it stays in the trash until restart");
                false
            }
            Err(_) => {
                tracing::warn!(path = %path.display(), timeout_s = REMOVAL_TIMEOUT.as_secs(),
                    "removing a deleted volume's directory hangs; it stays in the trash until restart");
                false
            }
        }
    }
}

/// The name of bin `n` inside the trash.
fn bin_name(n: u64) -> String {
    format!("{BIN_PREFIX}{n:x}")
}

/// Creates `dir` and any missing parents, root-only like the trash itself; one that exists is
/// left as it is.
fn make_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// The removal thread: takes the oldest entry not given up on, removes it, and sleeps when
/// there is none. Ends when the trash is dropped.
fn run(trash: Weak<Trash>) {
    loop {
        let Some(this) = trash.upgrade() else {
            return;
        };
        let next = {
            let state = this.lock();
            state.pending.get(state.given_up).cloned()
        };
        match next {
            Some(name) => {
                let removed = this.remove(&name);
                let mut state = this.lock();
                let at = state.given_up;
                if removed {
                    state.pending.remove(at);
                } else {
                    state.given_up += 1;
                }
            }
            None => {
                let state = this.lock();
                if state.pending.len() == state.given_up {
                    // The timeout lets the thread notice that the trash was dropped.
                    let _ = this
                        .wake
                        .wait_timeout(state, Duration::from_secs(1))
                        .unwrap_or_else(|p| p.into_inner());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
        for _ in 0..1000 {
            if check() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("timed out waiting for {what}");
    }

    /// Deleted directories still in the trash at `dir`: in its bins, or at its top level
    /// where a version without bins left them.
    fn entries(dir: &Path) -> Vec<PathBuf> {
        let mut found = vec![];
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with(BIN_PREFIX)
            {
                found.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            } else {
                found.push(path);
            }
        }
        found
    }

    #[test]
    fn deleted_directories_and_trees_are_removed() {
        let data = tempfile::tempdir().unwrap();
        let trash = Trash::start(data.path()).unwrap();
        let empty = data.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let tree = data.path().join("tree");
        std::fs::create_dir_all(tree.join("a/b")).unwrap();
        std::fs::write(tree.join("a/b/file"), b"tenant data").unwrap();
        std::os::unix::fs::symlink("/etc", tree.join("a/escape")).unwrap();
        assert!(trash.put(&empty).unwrap());
        assert!(trash.put(&tree).unwrap());
        assert!(!trash.put(&tree).unwrap(), "already gone");
        assert!(!empty.exists() && !tree.exists());
        wait_until("an empty trash", || trash.backlog() == (0, 0));
        assert_eq!(entries(&data.path().join(TRASH_DIR)), Vec::<PathBuf>::new());
        assert!(Path::new("/etc/hostname").exists() || Path::new("/etc").exists());
    }

    #[test]
    fn a_mount_point_is_not_moved() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipping: needs root to mount");
            return;
        }
        let data = tempfile::tempdir().unwrap();
        let trash = Trash::start(data.path()).unwrap();
        let mounted = data.path().join("mounted");
        std::fs::create_dir(&mounted).unwrap();
        rustix::mount::mount(
            "tmpfs",
            &mounted,
            "tmpfs",
            rustix::mount::MountFlags::empty(),
            None,
        )
        .unwrap();
        let result = trash.put(&mounted);
        rustix::mount::unmount(&mounted, rustix::mount::UnmountFlags::empty()).unwrap();
        assert_eq!(result.unwrap_err(), Errno::BUSY);
        assert!(mounted.is_dir());
    }

    #[test]
    fn an_entry_that_cannot_be_removed_is_given_up_on_and_the_rest_is_removed() {
        let data = tempfile::tempdir().unwrap();
        let trash = Trash::start(data.path()).unwrap();
        let stuck = data.path().join("stuck");
        std::fs::create_dir(&stuck).unwrap();
        std::fs::write(stuck.join("pinned"), b"x").unwrap();
        let immutable = |flag: &str| {
            std::process::Command::new("chattr")
                .arg(flag)
                .arg(stuck.join("pinned"))
                .status()
                .is_ok_and(|s| s.success())
        };
        if !rustix::process::geteuid().is_root() || !immutable("+i") {
            eprintln!("skipping: needs root and chattr +i on this filesystem");
            return;
        }
        let other = data.path().join("other");
        std::fs::create_dir(&other).unwrap();
        assert!(trash.put(&stuck).unwrap());
        assert!(trash.put(&other).unwrap());
        wait_until("the removable entry to go", || trash.backlog() == (1, 1));
        let left = entries(&data.path().join(TRASH_DIR));
        assert_eq!(left.len(), 1);
        // Undo the immutable flag so the temporary directory can be cleaned up.
        let pinned = left[0].join("pinned");
        assert!(
            std::process::Command::new("chattr")
                .arg("-i")
                .arg(&pinned)
                .status()
                .unwrap()
                .success()
        );
    }

    #[test]
    fn what_an_earlier_run_left_is_removed() {
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().join(TRASH_DIR);
        std::fs::create_dir_all(dir.join("left/deep")).unwrap();
        std::fs::write(dir.join("left/deep/data"), b"x").unwrap();
        std::fs::create_dir(dir.join("empty")).unwrap();
        std::fs::create_dir_all(dir.join(bin_name(3)).join("binned/deep")).unwrap();
        let trash = Trash::start(data.path()).unwrap();
        wait_until("an empty trash", || trash.backlog() == (0, 0));
        assert_eq!(entries(&dir), Vec::<PathBuf>::new());
        let bins = std::fs::read_dir(&dir).unwrap().count() as u64;
        assert_eq!(bins, BINS, "the bins stay for the next deletions");
    }

    #[test]
    fn a_bin_removed_by_hand_is_made_again() {
        let data = tempfile::tempdir().unwrap();
        let trash = Trash::start(data.path()).unwrap();
        let dir = data.path().join(TRASH_DIR);
        for bin in 0..BINS {
            std::fs::remove_dir(dir.join(bin_name(bin))).unwrap();
        }
        let volume = data.path().join("volume");
        std::fs::create_dir(&volume).unwrap();
        assert!(trash.put(&volume).unwrap(), "the volume was there to move");
        assert!(!volume.exists());
        wait_until("an empty trash", || trash.backlog() == (0, 0));
        assert_eq!(entries(&dir), Vec::<PathBuf>::new());
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::create_dir(&volume).unwrap();
        assert!(
            trash.put(&volume).unwrap(),
            "even the whole trash is made again"
        );
        assert!(!volume.exists());
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn a_file_or_symlink_where_a_bin_belongs_is_removed_and_the_bin_made() {
        let data = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), b"not ours").unwrap();
        let dir = data.path().join(TRASH_DIR);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join(bin_name(2)), b"a file").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.join(bin_name(5))).unwrap();
        let trash = Trash::start(data.path()).unwrap();
        wait_until("an empty trash", || trash.backlog() == (0, 0));
        assert_eq!(
            std::fs::read(outside.path().join("keep")).unwrap(),
            b"not ours",
            "the link was removed, not followed"
        );
        for bin in 0..BINS {
            let meta = std::fs::symlink_metadata(dir.join(bin_name(bin))).unwrap();
            assert!(meta.is_dir(), "bin {bin} is a real directory");
        }
        assert_eq!(entries(&dir), Vec::<PathBuf>::new());
        // Deletions land inside the trash, not where the link pointed.
        let volume = data.path().join("volume");
        std::fs::create_dir(&volume).unwrap();
        for _ in 0..BINS {
            std::fs::create_dir_all(&volume).unwrap();
            assert!(trash.put(&volume).unwrap());
        }
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_trash_that_is_not_a_directory_is_refused() {
        let data = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::set_permissions(outside.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink(outside.path(), data.path().join(TRASH_DIR)).unwrap();
        let error = Trash::start(data.path()).unwrap_err();
        assert!(error.to_string().contains("is not a directory"), "{error}");
        let mode = std::fs::metadata(outside.path())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o755, "the link's target was not chmodded");
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        std::fs::remove_file(data.path().join(TRASH_DIR)).unwrap();
        std::fs::write(data.path().join(TRASH_DIR), b"a file").unwrap();
        let error = Trash::start(data.path()).unwrap_err();
        assert!(error.to_string().contains("is not a directory"), "{error}");
    }

    #[test]
    fn consecutive_deletions_go_to_different_bins() {
        let data = tempfile::tempdir().unwrap();
        let trash = Trash::start(data.path()).unwrap();
        let bins: std::collections::HashSet<String> = (0..BINS)
            .map(|_| {
                let name = trash.next_name();
                let (bin, _) = name.split_once('/').unwrap();
                assert!(data.path().join(TRASH_DIR).join(bin).is_dir(), "{bin}");
                bin.to_string()
            })
            .collect();
        assert_eq!(bins.len() as u64, BINS);
    }
}
